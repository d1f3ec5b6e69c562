"""The rank-aware logger: rank 0 prints bare lines; other ranks only at debug level, marked with their rank."""
from __future__ import annotations

import logging

import pytest

from trainer import logs


@pytest.fixture
def at_rank(monkeypatch):
    def set_rank(r: int) -> None:
        monkeypatch.setattr(logs, "rank", lambda: r)
    return set_rank


def test_rank0_prints_the_bare_line_other_ranks_stay_quiet(at_rank, capsys):
    log = logs.get_logger("test")
    at_rank(0)
    log.info("[pretrain] epoch 1/2 step 4/4 loss 2.3026")
    at_rank(1)
    log.info("from rank 1")
    assert capsys.readouterr().out == "[pretrain] epoch 1/2 step 4/4 loss 2.3026\n"


def test_every_rank_prints_at_debug_level(at_rank, capsys, monkeypatch):
    monkeypatch.setenv(logs.LEVEL_ENV, "debug")
    log = logs.get_logger("test")
    try:
        at_rank(1)
        log.debug("detail")
        at_rank(0)
        log.info("line")
        assert capsys.readouterr().out == "[rank 1] detail\nline\n"
    finally:
        logging.getLogger(logs.ROOT).setLevel(logging.INFO)


def test_an_unknown_level_names_the_allowed_ones(monkeypatch):
    monkeypatch.setenv(logs.LEVEL_ENV, "loud")
    with pytest.raises(ValueError, match="TDC_LOG_LEVEL='LOUD': allowed DEBUG, INFO, WARNING, ERROR"):
        logs.get_logger("test")
