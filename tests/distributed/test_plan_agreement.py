"""Every rank follows rank 0's staleness decisions (spy stages, no processes): a rank that read the work
dir at another moment must not skip a stage the others run, or every collective after it hangs."""
from unittest import mock

import pytest

from pipeline import distributed
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.runner import Runner
from tests.pipeline.test_runner import FakeData, stages  # noqa: F401  (the spy-stage fixture)


def test_a_rank_runs_what_rank_0_decided_even_if_it_sees_the_stage_fresh(tmp_path, stages, monkeypatch):  # noqa: F811
    Runner(Config(), tmp_path, log=lambda m: None, stages=stages, data=FakeData()).run(["teacher"])
    stages["teacher"].run.reset_mock()

    def as_rank_0_saw_it(decisions):  # rank 0 read the work dir before teacher/ was in place
        return [(name, fp, False, "missing") for name, fp, _fresh, _reason in decisions]

    monkeypatch.setattr(distributed, "broadcast_object", mock.Mock(side_effect=as_rank_0_saw_it))
    lines = []
    Runner(Config(), tmp_path, log=lines.append, stages=stages, data=FakeData()).run(["teacher"])
    stages["teacher"].run.assert_called_once()
    assert "teacher: missing, running" in lines


def test_ranks_with_different_fingerprints_stop_with_a_user_error(tmp_path, stages, monkeypatch):  # noqa: F811
    monkeypatch.setattr(distributed, "broadcast_object",
                        lambda decisions: [(name, "0" * 64, fresh, why) for name, _fp, fresh, why in decisions])
    with pytest.raises(UserError, match="different configs, code or data"):
        Runner(Config(), tmp_path, log=lambda m: None, stages=stages, data=FakeData()).run(["teacher"])
    stages["teacher"].run.assert_not_called()
