"""The metric writer's console: the progress bar keeps the headline figures (eval loss included) across
rows, and without a bar each row is one plain line; rows also reach metrics.jsonl unchanged."""

import json

from jaxllm.metrics import MetricsWriter

ROWS = [{"step": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_sec": 1234.5, "mfu": 0.0123, "skipped_steps": 0},
        {"step": 2, "eval_loss": 2.75, "eval_perplexity": 15.64}]


def test_without_a_bar_every_row_is_one_console_line(tmp_path, capsys):
    writer = MetricsWriter(tmp_path, 10, 0, tensorboard=False, progress_bar=False)
    for row in ROWS:
        writer.write(row)
    writer.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 1/10 | loss 2.5 | lr 0.001 | tokens_per_sec 1234 | mfu 0.0123 | skipped_steps 0",
                     "step 2/10 | eval_loss 2.75 | eval_perplexity 15.64"]
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == ROWS


def test_the_bar_keeps_the_training_figures_and_adds_the_eval_loss(tmp_path, capsys):
    writer = MetricsWriter(tmp_path, 10, 0, tensorboard=False, progress_bar=True)
    for row in ROWS:
        writer.write(row)
    assert writer._bar.postfix == "loss=2.500, tok_s=1234, mfu=1.2%, eval=2.750"
    writer.close()
    assert capsys.readouterr().out == ""  # the bar draws on stderr; no plain lines with a bar
