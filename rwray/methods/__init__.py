"""Registry of reweighting methods: one file each, one entry here, one test file in tests/."""

from rwray.methods import absgd, erm
from rwray.methods.base import DataInfo, Method, StepInputs, StepOutput, weighted_loss
from rwray.registry import Registry, union_of

METHODS: Registry[Method] = Registry("method")
METHODS.add("erm", erm.ERMParams, erm.ERM, "empirical risk minimisation: uniform weights")
METHODS.add("absgd", absgd.ABSGDParams, absgd.ABSGD, "attentional-biased SGD: w_i = exp(loss_i/lambda)/u, moving-average u")

MethodConfig = union_of(METHODS)

__all__ = ["METHODS", "MethodConfig", "DataInfo", "Method", "StepInputs", "StepOutput", "weighted_loss"]
