"""Synthetic stand-ins for the large datasets, at their published shape and in their exact on-disk formats, so the
readers of `rwray.data.imagesources` and `rwray data prepare` read them unchanged (`rwray data synth`).

    from rwray.data.synth import SYNTHS, synthesize
    s = synthesize("inat2018", "data/raw/inat2018", scale=0.05, size=32)
    s.source   # {"name": "inat2018", "root": ".../data/raw/inat2018", ...}: the data.source block that reads it

One module per format (oltr: ImageNet-LT and Places-LT, inat, clothing, iwildcam, imagenet9), each a planner from
the request to the files (plan.py); profile.py holds the per-class count arithmetic (pure numpy), images.py the
learnable pictures and the process pool that writes them, run.py the checks and the atomic write. Data-side only:
nothing here imports the trainer or the tracking code.
"""

from rwray.data.synth.plan import Args, Synthesized, SynthSpec
from rwray.data.synth.profile import long_tail_counts, train_profile
from rwray.data.synth.run import synthesize
from rwray.data.synth.specs import SYNTHS

__all__ = ["SYNTHS", "Args", "SynthSpec", "Synthesized", "long_tail_counts", "synthesize", "train_profile"]
