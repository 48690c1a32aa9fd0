"""The CLI turns bad input into one line, a non-zero exit, and no traceback (unless --debug)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_llm_train.cli import main
from dist_llm_train.errors import UserError


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["baseline", "--set", "training.lrr=1"], "unknown key 'training.lrr'"),
        (["baseline", "--config", "no-such-preset"], "neither a file nor a preset"),
        (["baseline", "--set", "model.preset=gpt-huge"], "model.preset='gpt-huge'"),
        (
            ["baseline", "--set", "data.corpus=files", "--set", "data.path=/nonexistent/corpus"],
            "/nonexistent/corpus",
        ),
    ],
)
def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], args: list[str], fragment: str) -> None:
    code, _, err = _run(capsys, *args)
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err
    assert err.strip().startswith("error:")


def test_empty_corpus_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    code, _, err = _run(capsys, "baseline", "--set", "data.corpus=files", "--set", f"data.path={tmp_path}")
    assert code == 2
    assert "Traceback" not in err and "error:" in err


def test_corrupt_checkpoint_resume_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step-00000001").mkdir(parents=True)
    (ckpt / "step-00000001" / "state.json").write_text("{not json")
    (ckpt / "latest").write_text("step-00000001\n")
    code, _, err = _run(
        capsys, "baseline", "--resume", "--run-dir", str(tmp_path), "--set", "data.max_bytes=100000"
    )
    assert code == 2
    assert "corrupt" in err and "Traceback" not in err


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    with pytest.raises(UserError):
        main(["--debug", "baseline", "--set", "training.lrr=1"])


def test_config_show_and_validate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = _run(capsys, "config", "show", "--set", "training.lr=0.002")
    assert code == 0 and "lr: 0.002" in out
    good = tmp_path / "good.yaml"
    good.write_text("training:\n  max_steps: 5\n")
    code, out, _ = _run(capsys, "config", "validate", str(good))
    assert code == 0 and "valid" in out
    code, _, _err = _run(capsys, "presets")
    assert code == 0


def test_cuda_without_gpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        code, _, _ = _run(capsys, "config", "show", "--set", "training.device=cuda")
        assert code == 0
        return
    code, _, err = _run(capsys, "baseline", "--device", "cuda", "--set", "data.max_bytes=100000")
    assert code == 2 and "CUDA build" in err
