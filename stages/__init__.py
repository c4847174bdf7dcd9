"""The stages and their declarations; the runner reads STAGES and never the stage internals."""
from pipeline.runner import Stage
from stages import evaluate, mart, pseudolabel, teacher

_TRAINING_RESULTS = ("data.num_labeled", "run.seed", "run.precision")

STAGES = {
    "teacher": Stage(
        name="teacher", version=1, section="teacher", outputs=teacher.OUTPUTS, run=teacher.run,
        extra_params=_TRAINING_RESULTS),
    "pseudolabel": Stage(
        name="pseudolabel", version=1, section="pseudolabel", outputs=pseudolabel.OUTPUTS, run=pseudolabel.run,
        requires=lambda config: ("teacher",), insignificant=("batch_size",),
        extra_params=("run.precision",), uses_pool=True),
    "mart": Stage(
        name="mart", version=2, section="mart", outputs=mart.OUTPUTS, run=mart.run, requires=mart.requires,
        insignificant=("eval_batch_size", "pool_in_memory"), extra_params=_TRAINING_RESULTS),
    "eval": Stage(
        name="eval", version=1, section="eval", outputs=evaluate.OUTPUTS, run=evaluate.run,
        requires=evaluate.requires, insignificant=("batch_size",), extra_params=("mart.epsilon",)),
}
