"""`python -m jaxllm.aot --config=PATH --target=TARGET [--step=train|generate] [--json OUT] [section.key=value ...]`

Compiles the train step `python -m jaxllm.train --config=PATH` would run for TARGET's devices (say
`tpu:v5e:2x2`, `tpu:v5p:2x2x2`, `gpu:h100:1x8`, `gpu:a100-80g:48x8`) with the target's own compiler,
on this machine, and prints per device: the arguments (parameters, optimizer state, batch), outputs,
temporaries and aliasing as the compiler counts them, their total against the device's memory, the
model FLOPs of a step against the compiled program's, and the compile time. Exit status 0 when it
fits, 3 when it does not (with the compiler's own figures and what to try), 2 on a bad config or target.

`--step=generate [--quantize=none|w8a8|config] [--batch B] [--prompt-len P] [--max-new-tokens N] [--tensor T]`
compiles `python -m jaxllm.generate`'s program instead (prefill and KV-cache decode loop) and one decode
step, dense or quantized (`jaxllm.aot.generate`; docs/aot_generate.md), with the same exit statuses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax

from jaxllm import config as config_lib
from jaxllm import pipeline_plan
from jaxllm.aot import CompileReport, Target, compile_train_step
from jaxllm.errors import UserError, exit_status

DOES_NOT_FIT = 3
GIB = 2**30


def describe(report: CompileReport) -> str:
    mesh = " x ".join(f"{axis} {size}" for axis, size in report.mesh.items() if size > 1) or "one device"
    lines = [f"target {report.target}: {report.devices} devices, mesh {mesh}"]
    if report.pipeline:
        lines += pipeline_plan.describe(report.pipeline)
    if report.error:
        lines.append(f"the compiler refused the step: {report.error}")
    else:
        state_at = " on the host" if report.offloaded else ""  # mesh.offload; the parameters too when all of it is
        params_at = state_at if report.offloaded >= report.parameters + report.optimizer_state else ""
        lines += [
            "per device, as compiled:",
            f"  arguments     {report.arguments / GIB:9.3f} GiB  (parameters {report.parameters / GIB:.3f}{params_at}, "
            f"optimizer state {report.optimizer_state / GIB:.3f}{state_at}, "
            f"batch {report.batch / GIB:.3f})",
            f"  outputs       {report.outputs / GIB:9.3f} GiB  ({report.aliased / GIB:.3f} GiB of them written over "
            "donated arguments)",
            f"  temporaries   {report.temporaries / GIB:9.3f} GiB",
            f"  total         {report.total / GIB:9.3f} GiB of {report.capacity / GIB:.2f} GiB "
            f"({'fits, ' + format(report.headroom, '.0%') + ' headroom' if report.fits else 'does NOT fit'})",
            f"  --dry-run's estimate {report.estimate / GIB:.3f} GiB ({report.estimate / report.total - 1:+.0%})"
            + (f", host {report.estimate_host / GIB:.3f} GiB" if report.estimate_host else ""),
        ]
        if report.offloaded or report.host_total:
            lines.append(host_line(report))
        if report.compiled_flops:
            lines.append(flops_line(report))
    lines.append(f"compiled in {report.compile_seconds:.1f} s")
    if not report.fits:
        lines.append("to fit: rematerialise more (model.remat=dots or full), a smaller micro-batch (raise "
                     "train.grad_accum), or shard more (mesh.fsdp, mesh.tensor)")
    return "\n".join(lines)


def host_line(report: CompileReport) -> str:
    """Host memory per device: what the layout placed there (mesh.offload) and the compiler's figures."""
    return (f"  host memory   {report.host_total / GIB:9.3f} GiB  (offloaded state {report.offloaded / GIB:.3f}, "
            f"not counted in the device total; arguments {report.host_arguments / GIB:.3f}, temporaries "
            f"{report.host_temporaries / GIB:.3f})")


def flops_line(report: CompileReport) -> str:
    """Model against compiled FLOPs, like for like: XLA counts a loop's body once, so with gradient
    accumulation the compiled count is one micro-batch's, and with scanned layers one block's."""
    if report.scanned_layers:
        return (f"FLOPs per step: model {report.model_flops:.4g}; compiled {report.compiled_flops:.4g} counts the "
                "scanned block once, not once per layer")
    if report.pipeline:
        return (f"FLOPs per step: model {report.model_flops:.4g}; compiled {report.compiled_flops:.4g} counts the "
                "pipeline's loop body once (one block of one tick), not once per tick and block")
    model, what = report.model_flops / report.micro_batches, "per step"
    if report.micro_batches > 1:
        what = f"per micro-batch (1 of {report.micro_batches}; XLA counts the accumulation loop's body once)"
    ratio = report.compiled_flops / model
    return f"FLOPs {what}: model {model:.4g}, compiled {report.compiled_flops:.4g} ({ratio:.2f}x)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config, as for python -m jaxllm.train")
    parser.add_argument("--target", required=True, help="tpu:<version>:<topology> or gpu:<model>:<nodes>x<gpus>")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--step", choices=["train", "generate"], default="train",
                        help="the train step (default) or python -m jaxllm.generate's programs")
    generation = parser.add_argument_group("--step=generate")
    generation.add_argument("--quantize", choices=["none", "w8a8", "config"],
                            help="weights: f32 (none, default), ZeroQuant W8A8, or the config's compression section")
    generation.add_argument("--batch", type=int, help="prompts per call (default 1)")
    generation.add_argument("--prompt-len", type=int, help="prompt tokens (default model.max_len / 4)")
    generation.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: up to model.max_len)")
    generation.add_argument("--tensor", type=int, help="tensor-parallel degree (default: every device)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if not os.environ.get("JAX_PLATFORMS"):  # compile for the target; start no local accelerator
        jax.config.update("jax_platforms", "cpu")
    fits = []

    def run() -> None:
        target = Target.parse(args.target)
        config = config_lib.load(args.config, args.overrides)
        generation = {"quantize": args.quantize, "batch": args.batch, "prompt_len": args.prompt_len,
                      "max_new_tokens": args.max_new_tokens, "tensor": args.tensor}
        if args.step == "generate":
            from jaxllm.aot.generate import compile_generate_step, describe_generation

            report = compile_generate_step(config, target, **{k: v for k, v in generation.items() if v is not None})
            print(describe_generation(report), flush=True)
        else:
            given = [k for k, v in generation.items() if v is not None]
            if given:
                raise UserError(f"--{given[0].replace('_', '-')} applies to --step=generate, not --step=train")
            report = compile_train_step(config, target)
            print(describe(report), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        fits.append(report.fits)

    status = exit_status(run)
    return status if status or all(fits) else DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
