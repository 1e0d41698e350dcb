"""core.onnx.cpu_session: the one ONNX Runtime session every caller opens."""

import numpy as np
import torch

from dermkit.core.onnx import cpu_session


def _tiny_onnx(path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).eval()
    torch.onnx.export(model, (torch.randn(1, 4),), str(path), dynamo=False)
    return model


def test_session_runs_the_model_on_the_requested_threads_with_idle_threads_asleep(tmp_path):
    model = _tiny_onnx(tmp_path / "m.onnx")
    session = cpu_session(tmp_path / "m.onnx", threads=2)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    # spinning idle threads steal the cores from the next session: 3x slower batch-1 calls
    # for an exit model's segments on 2 cores (core/onnx.py)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(out, model(torch.from_numpy(x)).detach().numpy(), atol=1e-6)


def test_threads_none_leaves_the_thread_count_to_onnxruntime(tmp_path):
    _tiny_onnx(tmp_path / "m.onnx")
    options = cpu_session(tmp_path / "m.onnx", threads=None).get_session_options()
    assert options.intra_op_num_threads == 0  # onnxruntime's "choose for me"
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
