"""Registry of reweighting methods: one file each, one entry here, one test file in tests/."""

from rwray.methods import (absgd, baselines, batch_reweight, erm, group_dro, jtt, learned_mixin, meta_sampler, rebias,
                           rubi)
from rwray.methods.base import Method, StepInputs, StepOutput, weighted_loss
from rwray.registry import Registry, union_of

METHODS: Registry[Method] = Registry("method")
METHODS.add("erm", erm.ERMParams, erm.ERM, "empirical risk minimisation: uniform weights")
METHODS.add("absgd", absgd.ABSGDParams, absgd.ABSGD, "attentional-biased SGD: w_i = exp(loss_i/lambda)/u, moving-average u")

METHODS.add("rebias", rebias.ReBiasParams, rebias.ReBias, "ReBias: f minimises CE + lambda_f HSIC(f, g); g (1x1 convs) minimises CE - lambda_g HSIC(g, f)")
METHODS.add("vanilla", baselines.VanillaParams, baselines.Vanilla, "ReBias table baseline: target network f alone on CE (lambda = 0)")
METHODS.add("biased", baselines.BiasedParams, baselines.Biased, "ReBias table baseline: the biased network alone (job sets model.kernel=1)")
METHODS.add("rubi", rubi.RUBiParams, rubi.RUBi, "RUBi: CE(f_logits * sigmoid(fc(g_feat.detach()))) + CE on g")
METHODS.add("learned_mixin", learned_mixin.LearnedMixinParams, learned_mixin.LearnedMixin, "LearnedMixin+H: CE(f + softplus(fc(f_feat)) log p_g) + 0.36 H; g frozen after pre-training")
METHODS.add("batch_reweight", batch_reweight.BatchReweightParams, batch_reweight.BatchReweight, "batch reweighting: w = softmax(-p/temp), p = #similar per-sample gradients in the batch")

METHODS.add("group_dro", group_dro.GroupDROParams, group_dro.GroupDRO, "GroupDRO: online group weights q_g <- q_g exp(eta l_g), loss sum_g q_g l_g (global over workers)")
METHODS.add("meta_sampler", meta_sampler.MetaSamplerParams, meta_sampler.MetaSampler, "BALMS Meta Sampler as class weights: w_c = sigmoid(theta_c), theta meta-learned through one look-ahead classifier step (frozen features)")
METHODS.add("jtt", jtt.JTTParams, jtt.JTT, "JTT: ERM for identify_epochs, then the samples it got wrong weighted lam_up")

MethodConfig = union_of(METHODS)

__all__ = ["METHODS", "MethodConfig", "Method", "StepInputs", "StepOutput", "weighted_loss"]
