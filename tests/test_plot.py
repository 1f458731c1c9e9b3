"""`python -m jaxllm.plot` on real short runs: the PNG exists and shows each run's series."""

import json

import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm.plot import PANELS, main, plot_runs, read_metrics
from jaxllm.train import train
from tests.test_train import TINY

# matplotlib's first two default line colours: the first and second run of every panel.
RUN_COLOURS = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, devices):
    runs = []
    for name, lr in (("base", "1e-3"), ("fast", "3e-3")):
        workdir = tmp_path_factory.mktemp(name)
        cfg = config_lib.load(None, [*TINY, "train.steps=6", "train.log_every=1", "eval.every=3",
                                     "eval.batches=1", "checkpoint.every=0", f"train.lr={lr}"])
        train(cfg, workdir)
        runs.append(workdir)
    return runs


def _pixels_of(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    rgb = (image[..., :3] * 255).round().astype(int)
    return np.all(np.abs(rgb - np.array(colour)) <= 2, axis=-1)


def test_read_metrics_returns_logged_series(two_runs):
    series = read_metrics(two_runs[0])
    rows = [json.loads(line) for line in (two_runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert series["loss"] == [(r["step"], r["loss"]) for r in rows]
    assert [step for step, _ in series["eval_loss"]] == [3, 6]


def test_plot_two_runs_draws_every_panel_for_each_run(two_runs, tmp_path):
    import matplotlib.image

    out = plot_runs(two_runs, tmp_path / "cmp.png", labels=["base", "fast"])
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (700, 1100)
    height, width = image.shape[:2]
    quadrants = [image[:height // 2, :width // 2], image[:height // 2, width // 2:],
                 image[height // 2:, :width // 2], image[height // 2:, width // 2:]]
    for (key, _), quadrant in zip(PANELS, quadrants, strict=True):
        for colour in RUN_COLOURS:  # each run's line (or eval markers) is visible in each panel
            assert _pixels_of(quadrant, colour).sum() > 20, (key, colour)


def test_cli_writes_png_and_reports_bad_workdirs(two_runs, tmp_path, capsys):
    assert main([str(two_runs[0]), "--out", str(tmp_path / "one.png")]) == 0
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no metrics file" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{oops\n')
    assert main([str(tmp_path / "broken"), "--out", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl:2" in capsys.readouterr().err
    assert main([*map(str, two_runs), "--labels", "only-one", "--out", str(tmp_path / "y.png")]) == 2


def test_a_series_no_run_logged_gets_no_empty_panel(tmp_path):
    import matplotlib.image

    runs = []
    for name, scale in (("a", 1.0), ("b", 0.5)):  # as eval.every=0 leaves it: no eval_loss rows
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "loss": scale * (5 - s / 3), "lr": scale * 1e-3 * s, "tokens_per_sec": scale * 100 * s}
                for s in range(1, 11)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    image = matplotlib.image.imread(plot_runs(runs, tmp_path / "no_eval.png"))
    assert image.shape[:2] == (380, 1350)  # one row of three panels
    width = image.shape[1]
    for third in range(3):
        panel = image[:, third * width // 3:(third + 1) * width // 3]
        for colour in RUN_COLOURS:
            assert _pixels_of(panel, colour).sum() > 20, (third, colour)
