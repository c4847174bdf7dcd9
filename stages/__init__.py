"""The stage registry: each stage module declares its `STAGE` next to its code; the runner reads these."""
from stages import evaluate, mart, pseudolabel, teacher

STAGES = {module.STAGE.name: module.STAGE for module in (teacher, pseudolabel, mart, evaluate)}
