"""``mocae serve`` and ``mocae export``, hooked into the main parser by ``add_serve_commands(sub)``.

Only argparse here: the server's and the model's imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_serve(args: argparse.Namespace) -> int:
    from mocae.serve.app import ServeConfig, run_server

    cfg = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                      max_tokens_cap=args.max_tokens_cap, request_timeout_s=args.timeout,
                      batch_wait_ms=args.batch_wait_ms, max_prompt_tokens=args.max_prompt_tokens,
                      continuous=not args.no_continuous)
    run_server(args.model, cfg, backbone=args.backbone, model_id=args.name, system=args.system)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mocae.export import export_mixture

    record = export_mixture(args.model, args.weights, args.out)
    mix = ", ".join(f"{a}={w:.3f}" for a, w in record["weights"].items())
    print(f"wrote {args.out}: one peft LoRA adapter of rank {record['rank']} ({mix}) on {record['backbone']}; "
          f"load it with PeftModel.from_pretrained or vLLM's LoRARequest")
    return 0


def _cmd_pareto(args: argparse.Namespace) -> int:
    from mocae.pipeline import load_eval_config
    from mocae.pareto import ParetoConfig, run_pareto

    update = {"efficiency": False}
    if args.n is not None:
        update.update(n_helpful=args.n, n_harmful=args.n, n_xstest_safe=args.n, n_truthfulqa=args.n,
                      n_jailbreak=min(args.n, 162))
    eval_cfg = load_eval_config(args.preset).model_copy(update=update)
    cfg = ParetoConfig(steps=args.steps, sweep=args.sweep.split(","), eval=eval_cfg)
    out = args.out or str(Path(args.model).resolve().parent / "pareto")
    report = run_pareto(args.model, cfg, out, progress=not args.no_progress)
    for row in report["points"]:
        scores = ", ".join(f"{a} {o['value']:.1f}" for a, o in row["objectives"].items() if o)
        print(f"{row['name']:<28} {scores}{'  *front' if row.get('nondominated') else ''}")
    print(f"wrote {out}/pareto.json and {report['plot']}")
    return 0


def add_serve_commands(sub) -> None:
    """Add ``serve``, ``export`` and ``pareto`` to the ``mocae`` subparsers."""
    p = sub.add_parser(
        "serve", help="OpenAI-compatible chat server for a MoCaE (or any saved) model, steerable per request",
        description="Serve POST /v1/chat/completions (plain and stream), GET /v1/models and GET /health. "
                    "Requests may add axis_weights, prior and routing_mode; every answer carries its routing. "
                    "Concurrent requests with different mixtures are decoded in one batch.")
    p.add_argument("--model", required=True, help="a saved MoCaE folder, a peft adapter folder, or 'base'")
    p.add_argument("--system", default=None,
                   help="with --model RUN_DIR (a `mocae run` directory): serve this system of the run, e.g. ties, "
                        "expert_honest, mocae")
    p.add_argument("--backbone", default=None, help="backbone for 'base' or an adapter (default: the recorded one)")
    p.add_argument("--name", default=None, help="model id clients send (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    p.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens accepted (default 512)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt accepted (default 2048)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds (default 120)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long the batcher waits for more requests to join a batch (default 5 ms)")
    p.add_argument("--no-continuous", action="store_true",
                   help="requests arriving mid-decode wait for the next batch instead of joining the running one")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "export", help="write a fixed mixture of a MoCaE's experts as one plain peft adapter (exact)",
        description="Rank concatenation of the experts with the weights folded in: the adapter's logits equal "
                    "MoCaE with those static weights. Any peft user or vLLM's multi-LoRA can serve it.")
    p.add_argument("--model", required=True, help="a saved MoCaE folder")
    p.add_argument("--weights", required=True, metavar="AXIS=W,...",
                   help="e.g. helpful=1,harmless=1,honest=2 (normalised to sum 1; axes left out get 0)")
    p.add_argument("--out", required=True, help="output adapter folder (replaced atomically)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "pareto", help="HHH front of MoCaE steered by priors vs the static merge of its experts, on a simplex grid",
        description="Evaluate MoCaE with its router tilted by each grid point (prior) and the experts mixed with "
                    "each grid point's fixed weights (static merge), on the same prompts; write pareto.json "
                    "(objectives, non-dominated points, paired MoCaE - static differences) and pareto.png.")
    p.add_argument("--model", required=True, help="a saved MoCaE folder")
    p.add_argument("--steps", type=int, default=2, help="grid resolution (2: 6 points on 3 axes; 3: 10)")
    p.add_argument("--n", type=int, default=32, help="prompts per eval set at every point (default 32)")
    p.add_argument("--preset", default="quick", help="eval preset the other settings come from (default quick)")
    p.add_argument("--sweep", default="mocae,static", help="series: mocae, static or both (default)")
    p.add_argument("--out", default=None, help="output folder (default: pareto/ beside the model)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_pareto)
