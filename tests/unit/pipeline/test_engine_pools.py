"""Which weights a running engine pool can take in place (pipeline.engines.architecture), and
what identifies the weights a pool serves (workers.vllm_pool.weights_id)."""

import json
import os

from pipeline.engines import architecture
from workers.vllm_pool import weights_id


def model_dir(path, **config):
    path.mkdir()
    base = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "tie_word_embeddings": True, "torch_dtype": "float32", "_name_or_path": str(path)}
    (path / "config.json").write_text(json.dumps({**base, **config}))
    (path / "model.safetensors").write_bytes(b"weights")
    return str(path)


def test_a_pool_takes_weights_of_the_same_architecture(tmp_path):
    a = model_dir(tmp_path / "a")
    renamed = model_dir(tmp_path / "b", torch_dtype="bfloat16", transformers_version="5.19")
    bigger = model_dir(tmp_path / "c", hidden_size=128)
    assert architecture(a) == architecture(renamed)  # naming and dtype keys aside
    assert architecture(a) != architecture(bigger)  # another pool


def test_weights_written_again_at_the_same_path_are_other_weights(tmp_path):
    path = model_dir(tmp_path / "m")
    before = weights_id(path)
    assert weights_id(path) == before
    st = (tmp_path / "m" / "model.safetensors").stat()
    os.utime(tmp_path / "m" / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert weights_id(path) != before
    assert weights_id(model_dir(tmp_path / "other")) != before
