"""compile() takes a torch / transformers model with example inputs and captures it itself."""

import numpy as np
import pytest
import torch

import mgvq_compile
from mgvq_compile.errors import InputError
from mgvq_compile.runtime import create_session
from _models import tiny_llama


def test_compile_a_transformers_model(tmp_path):
    model, inputs = tiny_llama()
    result = mgvq_compile.compile(model, example_inputs=inputs, method="rtn", bits=8, output=tmp_path / "out",
                                  resume=False, progress=False)
    names = {layer["name"] for layer in result.report["layers"]}
    assert "model.layers.0.self_attn.q_proj.weight" in names  # module paths survive capture
    session = create_session(tmp_path / "out" / "model.onnx")
    (logits,) = session.run(["logits"], {"input_ids": inputs["input_ids"].numpy()})
    with torch.no_grad():
        expected = model(**inputs).logits.numpy()
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) < 0.05  # 8-bit RTN stays close


def test_a_torch_model_needs_example_inputs(tmp_path):
    model, _inputs = tiny_llama()
    with pytest.raises(InputError, match="example_inputs"):
        mgvq_compile.compile(model, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
