"""Plot bench_serving results: output tokens/s and TTFT (p50, p99) against the offered request rate,
one point per (rate, repeat), as a dependency-free SVG (renders in the README).

    python bench/plot_serving.py bench/results/serving_h200.json --out bench/results/serving_h200.svg

"inf" (all requests at once) is drawn at the right edge, past the largest finite rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 360, 260, 62, 14, 34, 44


def _panel(x0: float, title: str, xs: list[float], series: list[tuple[str, str, list[float]]],
           xlabels: list[tuple[float, str]], ylabel: str) -> str:
    ymax = max((v for _, _, vals in series for v in vals if math.isfinite(v)), default=1.0) * 1.1 or 1.0
    xmax = max(xs) * 1.0 or 1.0

    def px(x: float) -> float:
        return x0 + PAD_L + (W - PAD_L - PAD_R) * x / xmax

    def py(y: float) -> float:
        return PAD_T + (H - PAD_T - PAD_B) * (1 - y / ymax)

    out = [f'<text x="{x0 + W / 2}" y="18" text-anchor="middle" font-weight="bold">{title}</text>',
           f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(xmax)}" y2="{py(0)}" stroke="black"/>',
           f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(0)}" y2="{py(ymax)}" stroke="black"/>',
           f'<text x="{x0 + 14}" y="{(PAD_T + H - PAD_B) / 2}" text-anchor="middle" '
           f'transform="rotate(-90 {x0 + 14} {(PAD_T + H - PAD_B) / 2})">{ylabel}</text>',
           f'<text x="{px(xmax / 2)}" y="{H - 6}" text-anchor="middle">request rate (req/s)</text>']
    for i in range(5):
        y = ymax * i / 4
        out.append(f'<text x="{px(0) - 4}" y="{py(y) + 4}" text-anchor="end">{y:,.0f}</text>')
        out.append(f'<line x1="{px(0)}" y1="{py(y)}" x2="{px(xmax)}" y2="{py(y)}" stroke="#ddd"/>')
    for x, label in xlabels:
        out.append(f'<text x="{px(x)}" y="{py(0) + 16}" text-anchor="middle">{label}</text>')
    for k, (name, color, vals) in enumerate(series):
        pts = sorted((x, v) for x, v in zip(xs, vals, strict=True) if math.isfinite(v))
        for x, v in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="3" fill="{color}"/>')
        med: dict[float, list[float]] = {}
        for x, v in pts:
            med.setdefault(x, []).append(v)
        line = " ".join(f"{px(x):.1f},{py(sorted(v)[len(v) // 2]):.1f}" for x, v in sorted(med.items()))
        out.append(f'<polyline points="{line}" fill="none" stroke="{color}"/>')
        out.append(f'<text x="{px(0) + 8}" y="{PAD_T + 14 * k + 4}" fill="{color}">{name}</text>')
    return "\n".join(out)


def render(report: dict[str, Any]) -> str:
    runs = report["runs"]
    finite = [r["request_rate"] for r in runs if r["request_rate"] != "inf"]
    inf_x = (max(finite) * 1.25) if finite else 1.0
    xs = [inf_x if r["request_rate"] == "inf" else float(r["request_rate"]) for r in runs]
    labels = sorted({(x, "all" if r["request_rate"] == "inf" else f"{x:g}") for x, r in zip(xs, runs, strict=True)})
    tput = [("output tok/s", "#1f77b4", [r["output_throughput"] for r in runs])]
    ttft = [("TTFT p50", "#2ca02c", [r["median_ttft_ms"] for r in runs]),
            ("TTFT p99", "#d62728", [r["p99_ttft_ms"] for r in runs])]
    a = report.get("args", {})
    caption = (f"{report.get('device', '?')}: {a.get('dataset')} {a.get('num_prompts')} prompts, input ~{a.get('input_len')}, "
               f"output {a.get('output_len')}; each point a run, lines through medians")
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{H + 18}" font-family="sans-serif" '
        f'font-size="11">', '<rect width="100%" height="100%" fill="white"/>',
        _panel(0, "throughput", xs, tput, labels, "output tokens/s"),
        _panel(W, "time to first token", xs, ttft, labels, "ms"),
        f'<text x="{W}" y="{H + 12}" text-anchor="middle" fill="#555">{caption}</text>', "</svg>"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", help="bench_serving JSON")
    p.add_argument("--out", required=True, help="SVG path")
    args = p.parse_args(argv)
    with open(args.report, encoding="utf-8") as f:
        report = json.load(f)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(render(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
