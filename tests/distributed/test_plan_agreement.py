"""Every rank follows rank 0's staleness decisions (spy stages, no processes): a rank that read the work
dir at another moment must not skip a stage the others run, or every collective after it hangs."""
from unittest import mock

import pytest

from pipeline.core import distributed
from pipeline.core.errors import UserError
from tests.pipeline.test_runner import make_runner, sources, stages  # noqa: F401  (spy-stage fixtures)


def test_a_rank_runs_what_rank_0_decided_even_if_it_sees_the_stage_fresh(tmp_path, stages, monkeypatch):  # noqa: F811
    make_runner(tmp_path, stages)[0].run(["teacher"])
    stages["teacher"].run.reset_mock()

    def as_rank_0_saw_it(decisions):  # rank 0 read the work dir before teacher/ was in place
        return [(name, fp, False, "missing") for name, fp, _fresh, _reason in decisions]

    monkeypatch.setattr(distributed, "broadcast_object",
                        # rank 0 also finds no entry built meanwhile when it takes the entry's lock
                        mock.Mock(side_effect=lambda obj: as_rank_0_saw_it(obj) if isinstance(obj, list) else
                                  (False if isinstance(obj, bool) else obj)))
    runner, lines = make_runner(tmp_path, stages)
    runner.run(["teacher"])
    stages["teacher"].run.assert_called_once()
    assert "teacher: missing, running" in lines


def test_ranks_with_different_fingerprints_stop_with_a_user_error(tmp_path, stages, monkeypatch):  # noqa: F811
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: [
        (name, "0" * 64, fresh, why) for name, _fp, fresh, why in obj] if isinstance(obj, list) else obj)
    with pytest.raises(UserError, match="different configs, code or data"):
        make_runner(tmp_path, stages)[0].run(["teacher"])
    stages["teacher"].run.assert_not_called()
