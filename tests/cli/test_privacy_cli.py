"""``asymml privacy``: bad options are refused with one clear line; a tiny report has every artefact."""

from __future__ import annotations

import json

import pytest
import torch

from asymml.cli.main import main


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--sigma", "-1", "inversion"], "sigma must be a finite number >= 0"),
        (["--epsilon", "0", "--out", "x"], "epsilon must be a finite number > 0"),
        (["--epsilons", "4,-1", "--out", "x"], "epsilon must be a finite number > 0"),
        (["--delta", "0", "--out", "x"], "delta must be in (0, 1)"),
        (["--delta", "1.5", "--out", "x"], "delta must be in (0, 1)"),
        (["--epsilons", "8", "--sigmas", "2", "--out", "x"], "conflicting options"),
        (["--modes", "asym,dp", "--out", "x"], "unknown mode 'dp'"),
        (["--noise-ratio", "0", "--out", "x"], "noise_ratio"),
        (["--sigmas", "0", "--out", "x"], "sigma must be > 0"),
        ([], "needs --out DIR"),
    ],
)
def test_bad_options_are_refused_clearly(argv: list[str], match: str, capsys: pytest.CaptureFixture[str],
                                         tmp_path) -> None:
    argv = [str(tmp_path / a) if a == "x" else a for a in argv]
    assert main(["privacy", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asymml privacy: error:") and match in err
    assert len(err.splitlines()) == 1  # one line, no traceback
    assert not (tmp_path / "x").exists()  # refused before doing anything


def test_unknown_action_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["privacy", "steal"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_tiny_report_has_every_artefact(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    argv = ["privacy", "--out", str(out), "--quick", "--modes", "plain,noise-only,asym+noise", "--epsilons", "8",
            "--epochs", "1", "--batch-size", "64", "--limit-train", "128", "--dlg-iters", "3", "--batch-sizes", "1,2",
            "--public-per-image", "8", "--private-per-image", "4", "--extra-public", "2", "--layers", "input"]
    assert main(argv) == 0
    for name in ("privacy.json", "figures.json", "summary.md", "grid_inversion.png", "grid_dlg.png",
                 "privacy_utility.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "privacy.json").read_text())
    rows = data["rows"]
    assert [r["mode"] for r in rows] == ["plain", "noise-only", "asym+noise"]
    for r in rows:
        for key in ("mode", "sigma", "epsilon", "delta", "test_accuracy", "inversion_psnr", "inversion_ssim",
                    "dlg_psnr", "dlg_psnr_b1", "dlg_psnr_b2", "mi_nats", "inversion_npsnr", "inversion_nssim",
                    "reid_accuracy", "reid_chance", "span_u_cos", "covers", "privacy_notes"):
            assert key in r, key
    plain, noisy = rows[0], rows[1:]
    assert plain["sigma"] == 0 and plain["epsilon"] is None
    assert plain["inversion_psnr"] >= 25.0  # the attack works where nothing is protected
    assert plain["reid_accuracy"] > 0.5 and plain["covers"] == []
    for r in noisy:
        assert r["sigma"] > 0 and r["epsilon"] == pytest.approx(8.0, rel=0.05) and r["delta"] == 1e-5
        # one epsilon for everything that leaves the trusted context, with secure Poisson sampling
        assert {"activations", "updates", "sampling"} <= set(r["covers"]), r["covers"]
    assert "span(U)" in (out / "summary.md").read_text()
    assert "holds" in data["claim"] and data["command"].startswith("asymml privacy --out DIR --quick")
    summary = (out / "summary.md").read_text()
    assert "| mode |" in summary and "paper's claim" in summary
    assert "plain" in capsys.readouterr().out


def test_single_attack_subcommand_writes_json(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["privacy", "inversion", "--modes", "plain,asym", "--public-per-image", "8", "--private-per-image", "4",
            "--layers", "input", "--inversion-epochs", "0", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "inversion.json").read_text())
    by = {r["mode"]: r for r in data["rows"]}
    assert by["plain"]["inversion_psnr"] >= 25.0
    assert by["asym"]["inversion_psnr"] < by["plain"]["inversion_psnr"]
    # noise-free asym: the accelerator reads span(U) off the residual's null space (issue 9 item 8)
    assert by["asym"]["span_u_cos"] > 0.9 and by["plain"]["span_u_cos"] is None
    assert "inversion_psnr" in capsys.readouterr().out
