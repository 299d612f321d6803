"""The ``kimi-linear`` command line. Thin: every command calls into the library and prints.

    kimi-linear demo          KDA on random inputs: chunked vs token loop, errors and speed
"""

from __future__ import annotations

import argparse
import sys

import torch


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .ops import chunk_kda, fused_recurrent_kda
    from .utils import median_seconds, relative_rms_error

    console = Console()
    B, T, H, D = args.batch, args.seq_len, args.heads, args.head_dim
    if min(B, T, H, D) < 1:
        console.print("[red]error:[/red] --batch, --seq-len, --heads and --head-dim must be positive")
        return 2
    torch.manual_seed(args.seed)
    console.print(
        f"[bold]Kimi Delta Attention[/bold] on random inputs: B={B}, T={T}, H={H}, K=V={D}, "
        f"softplus gate, L2 norm and beta sigmoid in the operator, float32 on {torch.get_num_threads()} CPU threads"
    )
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    g = torch.randn(B, T, H, D)  # raw gate input; the operator applies -exp(A_log) * softplus(g + dt_bias)
    beta = torch.randn(B, T, H)
    A_log = torch.log(torch.empty(H).uniform_(1, 16))
    dt_bias = torch.randn(H * D) * 0.1
    kw = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
              A_log=A_log, dt_bias=dt_bias, output_final_state=True)

    with torch.no_grad(), console.status("float64 token-loop reference ..."):
        o_ref, s_ref = fused_recurrent_kda(*(x.double() for x in (q, k, v, g, beta)),
                                           **dict(kw, A_log=A_log.double(), dt_bias=dt_bias.double()))
    rows = []
    with torch.no_grad():
        for name, fn in [("chunked (C=64, WY form)", chunk_kda), ("token loop", fused_recurrent_kda)]:
            with console.status(f"timing {name} ..."):
                o, s = fn(q, k, v, g, beta, **kw)
                seconds = median_seconds(lambda: fn(q, k, v, g, beta, **kw), repeat=args.repeat, warmup=0)
            rows.append((name, seconds, relative_rms_error(o, o_ref), relative_rms_error(s, s_ref)))

        # Prefill in two pieces, carrying the state, then decode the last tokens one at a time.
        split = T // 2
        decode_from = max(split, T - 8)
        o1, state = chunk_kda(q[:, :split], k[:, :split], v[:, :split], g[:, :split], beta[:, :split], **kw)
        pieces = [o1]
        o2, state = chunk_kda(*(x[:, split:decode_from] for x in (q, k, v, g, beta)), initial_state=state, **kw)
        pieces.append(o2)
        for t in range(decode_from, T):
            o_t, state = fused_recurrent_kda(*(x[:, t : t + 1] for x in (q, k, v, g, beta)), initial_state=state, **kw)
            pieces.append(o_t)
        pieced = torch.cat(pieces, dim=1)

    table = Table(title="chunked vs token loop (errors: relative RMS against the float64 token loop)")
    table.add_column("path")
    table.add_column("time", justify="right")
    table.add_column("tokens/s", justify="right")
    table.add_column("error o", justify="right")
    table.add_column("error final state", justify="right")
    for name, seconds, err_o, err_s in rows:
        table.add_row(name, f"{seconds * 1e3:.1f} ms", f"{B * T / seconds:,.0f}", f"{err_o:.1e}", f"{err_s:.1e}")
    console.print(table)
    console.print(f"chunked is [bold]{rows[1][1] / rows[0][1]:.1f}x[/bold] faster than the token loop at T={T}")
    console.print(
        f"prefill in pieces ({split} + {decode_from - split} tokens) then {T - decode_from} decode steps: "
        f"error {relative_rms_error(pieced, o_ref):.1e}, final state {relative_rms_error(state, s_ref):.1e}"
    )
    worst = max(max(r[2], r[3]) for r in rows)
    if not worst < 1e-4:
        console.print(f"[red]error:[/red] the float32 paths disagree with the float64 reference ({worst:.1e})")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-linear", description="Kimi Linear: KDA operator and model tools")
    sub = parser.add_subparsers(dest="command")

    demo = sub.add_parser("demo", help="KDA on random inputs: chunked vs token loop, errors and speed")
    demo.add_argument("--seq-len", type=int, default=2048)
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--heads", type=int, default=4)
    demo.add_argument("--head-dim", type=int, default=128)
    demo.add_argument("--repeat", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # the bundled default job
        args = parser.parse_args(["demo", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
