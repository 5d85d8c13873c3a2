"""Shared fixtures. Integration tests share one local Ray cluster and one quick toy world."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
# Caches that survive between sessions (DeepSpeed op build, vLLM compile cache).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    from pipeline.toy import build_toy_world

    return build_toy_world(tmp_path_factory.mktemp("toy"), seed=0, quick=True,
                           n_train_pairs=64, n_eval_pairs=16, verbose=False)
