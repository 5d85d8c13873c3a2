"""Unit-test fixtures: a small trained tokenizer and the prepare stage's unit of work run
in-process (the code Ray Data runs, without Ray)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow.parquet as pq
import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


def load_data_script(name: str):
    """A generator script under tests/data/ as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    """A byte-level BPE with the toy world's ChatML special tokens and chat template."""
    from pipeline.toy.build import train_tokenizer

    corpus = [w for p in load_data_script("make_formats").PAIRS for w in p] * 30
    tok = train_tokenizer(corpus, vocab_size=300, max_length=256)
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def run_unit():
    """run_unit(tok_dir, path, data_cfg, requires_scores, out): every row group of `path`
    through PrepareUnit → (quarantined rows, written pairs, summaries)."""
    from pipeline.stages.prepare import PrepareUnit, row_group_units

    def run(tok_dir, path, cfg, requires_scores, out):
        out.mkdir(parents=True, exist_ok=True)
        unit = PrepareUnit(str(tok_dir), cfg.model_dump(), False, requires_scores, str(out))
        summaries = [unit.unit(**u) for u in row_group_units([path], rows_per_part=3)]
        quarantined = [q for s in summaries for q in s["quarantine"]]
        return quarantined, pq.read_table(out).to_pylist(), summaries

    return run
