"""The decision as Markdown (terminal) and as one self-contained HTML file with inline SVG."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from html import escape

import numpy as np

from . import svg
from .curve_fit import rows_to_reach
from .economics import monthly_cost
from .formatting import count, months, pct, usd
from .types import Decision


def _ci(q: dict) -> str:
    lo, hi = q.get("ci95") or (None, None)
    return f"{pct(q.get('value'))} [{pct(lo)}, {pct(hi)}]"


def _paired(p: dict | None) -> str:
    if not p:
        return "—"
    lo, hi = p.get("ci95") or (None, None)
    d = p.get("difference")
    if d is None:
        return "unknown"
    pv = p.get("p_value")
    return f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" + (f", p={pv:.3f}" if pv is not None else "")


def _ms(x) -> str:
    return "unknown" if x is None else f"{x:,.1f}"


def _tfp(t: dict) -> str:
    if t.get("value") is None:
        return "unknown"
    return f"{t['value']:,.0f} {t['unit']}"


def tables(d: Decision) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Every table of the report, as (header, rows) of strings, shared by both renderings."""
    out = {}
    cols = ["candidate", "role"] + [f"{m} (95% CI)" for m in d.candidates[0].quality] + \
        [f"vs reference, {d.metric} points (95% CI)", "latency p50 / p95 ms", "cost per 1M requests", "TFP"]
    rows = []
    for c in d.candidates:
        lat = (f"{_ms(c.latency.get('p50'))} / {_ms(c.latency.get('p95'))}" if c.latency.get("p50") is not None
               else c.latency.get("note") or "unknown")
        rows.append([c.spec, c.role, *(_ci(q) for q in c.quality.values()), _paired(c.paired.get(d.metric)), lat,
                     usd(c.cost_per_1m), _tfp(c.tfp)])
    out["candidates"] = (cols, rows)
    basis = [[c.spec, c.cost_basis, c.latency.get("note") or "", c.tokens_basis] for c in d.candidates]
    out["basis"] = (["candidate", "cost from", "latency from", "tokens from"], basis)
    econ_rows = []
    for spec, e in d.economics["specialists"].items():
        c = next(x for x in d.candidates if x.spec == spec)
        econ_rows.append([spec, (c.train or {}).get("method") or "unknown",
                          "unknown" if not c.train or c.train.get("wall_s") is None else f"{c.train['wall_s'] / 60:.1f} min",
                          usd(e.get("training_cost_usd")), count(e.get("break_even_monthly_requests")),
                          usd(e.get("api_usd_per_month")) if "api_usd_per_month" in e else "—",
                          usd(e.get("specialist_usd_per_month")) if "specialist_usd_per_month" in e else "—",
                          months(e.get("payback_months")) if "payback_months" in e else "—"])
    out["economics"] = (["specialist", "method", "training time", "training cost", "break-even requests/month",
                         "API per month", "specialist per month", "payback"], econ_rows)
    if d.curve:
        out["curve"] = (["train share", "train rows", f"test {d.curve.metric} (95% CI)", "run"],
                        [[f"{p['fraction']:.0%}", f"{p['train_rows']:,}", _ci(p), p["run_id"]] for p in d.curve.points])
    return out


def projection_lines(d: Decision) -> list[str]:
    if not d.curve or not d.curve.fit:
        return []
    f = d.curve.fit
    ref = next(c for c in d.candidates if c.role == "reference").quality[d.metric]["value"]
    bar = ref - d.inputs.tolerance
    need = rows_to_reach(f, bar)
    lines = [f"Fit: error = {f['a']:.3g} x rows^-{f['b']:.3f} (exponent 95% CI {f['b_ci95'][0]:.3f} to "
             f"{f['b_ci95'][1]:.3f}).",
             f"Projected {d.metric} at 2x the data ({count(f['at_2x']['n'])} rows): {_ci(f['at_2x'])}; at 10x "
             f"({count(f['at_10x']['n'])} rows): {_ci(f['at_10x'])}.",
             f"Rows to reach {pct(bar)} (the reference's {pct(ref)} less the {100 * d.inputs.tolerance:.0f}-point "
             f"tolerance): {count(need['rows'])} (95% CI {count(need['ci95'][0])} to {count(need['ci95'][1])}), "
             + (f"i.e. {count(need['more'])} more than now." if need["more"] > 0 else
                "already reached with the rows used now.")]
    return lines


def history_lines(entries: list[dict]) -> list[str]:
    """One sentence per decision in a task's history (newest first)."""
    return [f"{e['when']}: rebase ({'; '.join(e['changes'])}): decided {e['before']} against {e['reference_before']}, "
            f"{'still ' if e['before'] == e['after'] else 'now '}{e['after']} against {e['reference_after']} "
            f"(run {e['run_id']})" for e in entries]


def header_lines(d: Decision) -> list[str]:
    i = d.inputs
    return [f"Task `{d.task}`, dataset `{d.dataset}`, {d.test_rows:,} test rows; reference: `{d.reference}`; "
            f"primary metric: {d.metric}.",
            f"Inputs: hardware {i.hardware_usd_per_hour:g} USD/hour; monthly requests "
            f"{count(i.monthly_requests) if i.monthly_requests else 'not given'}; value per success "
            f"{'%g USD' % i.value_per_success if i.value_per_success is not None else 'not given'}; tolerance "
            f"{100 * i.tolerance:.0f} points; API prices as of {d.prices_as_of or 'unknown'}."]


def run_line(d: Decision, lead: str = "") -> str:
    """What to run in production, in words ("" with NO VERDICT)."""
    if d.run is None:
        return ""
    if d.run == d.reference:
        return f"{lead}keep running {d.run}"
    return f"{lead}run {d.run} in production"


def markdown(d: Decision) -> str:
    out = [f"# Should we train a specialist for `{d.task}`?", "", *(f"> **Read first:** {w}\n" for w in d.warnings),
           *header_lines(d), "", f"## Recommendation: **{d.verdict}**{run_line(d, ' — ')}", "",
           *(f"- {r}" for r in d.reasons), ""]
    t = tables(d)

    def table(name):
        head, rows = t[name]
        return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
                *("| " + " | ".join(r) + " |" for r in rows), ""]

    out += ["## Candidates", "", *table("candidates"), *table("basis")]
    out += ["## Economics", "", *table("economics"),
            "Self-hosted cost counts whole machines, always on, at the measured throughput; the API is priced per "
            "request. Break-even: the monthly volume at which one always-on machine costs what the API does.", ""]
    out += ["## Learning curve", ""]
    if "curve" in t:
        out += [*table("curve"), *(f"- {x}" for x in projection_lines(d)), ""]
    else:
        out += ["No learning curve yet.", ""]
    out += ["## Risk", "", f"- {d.risk.get('summary', 'unknown: bench a cheap baseline and a specialist together')}", ""]
    if d.notes:
        out += ["## Notes", "", *(f"- {n}" for n in d.notes), ""]
    if d.history:
        out += ["## Decision history", "", *(f"- {x}" for x in history_lines(d.history)), ""]
    return "\n".join(out)


def _volume_series(d: Decision) -> tuple[list[dict], float | None]:
    ref = next(c for c in d.candidates if c.role == "reference")
    specs = [c for c in d.candidates if c.role == "specialist"]
    be = None
    for c in specs:
        e = d.economics["specialists"].get(c.spec, {})
        if e.get("break_even_monthly_requests") is not None:
            be = e["break_even_monthly_requests"] if be is None else min(be, e["break_even_monthly_requests"])
    anchor = [v for v in (be, d.inputs.monthly_requests) if v and math.isfinite(v)] or [1e6]
    lo, hi = max(1.0, min(anchor) / 100), max(anchor) * 100
    volumes = list(np.geomspace(lo, hi, 60))
    series = []
    for c in [ref, *specs]:
        pts = [(n, monthly_cost(c, n, d.inputs)) for n in volumes]
        if any(v is not None for _, v in pts):
            series.append({"label": c.spec, "role": c.role, "points": pts})
    return series, be


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.verdict{font-size:1.8em;font-weight:700;padding:.4em .8em;border-radius:8px;display:inline-block}
.TRAIN,.SWITCH{background:#e3f6e3;color:#1a6b1a}.NOT-YET{background:#fff4d6;color:#8a5a00}
.KEEP{background:#e4ecfd;color:#1a3a8a}.NO-VERDICT{background:#eee;color:#444}
.warning{border-left:5px solid #d08800;background:#fff8e6;padding:.6em 1em;margin:1em 0}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f6f6}.charts{display:grid;grid-template-columns:1fr 1fr;gap:1em}
.chart{width:100%;height:auto;background:#fff;border:1px solid #eee}
.chart text{font-size:11px;fill:#333}.chart .t{font-size:13px;font-weight:600}.chart .lbl{font-size:11px}
.chart .unk{fill:#999;font-style:italic}.chart .frame{fill:none;stroke:#999}.chart .grid{stroke:#eee}
.muted{color:#666;font-size:.9em}
"""


def html(d: Decision) -> str:
    """The self-contained HTML report (`protege decide --html`)."""
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>protege decide: {escape(d.task)}: {escape(d.verdict)}</title><style>{STYLE}</style></head><body>"
            f"{html_body(d)}<p class='muted'>Generated by protege decide on "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.</p></body></html>")


def html_body(d: Decision) -> str:
    """The report's content, without the page around it (the dashboard embeds it; its styles
    are `STYLE`)."""
    t = tables(d)

    def table(name):
        head, rows = t[name]
        return ("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</tbody></table>")

    ref = next(c for c in d.candidates if c.role == "reference")
    r_value = ref.quality[d.metric]["value"]
    quality = svg.quality_vs_cost([{"label": c.spec, "role": c.role, "cost": c.cost_per_1m,
                                    "value": c.quality[d.metric]["value"], "lo": c.quality[d.metric]["ci95"][0],
                                    "hi": c.quality[d.metric]["ci95"][1]} for c in d.candidates], d.metric)
    latency = svg.latency_bars([{"label": c.spec, "role": c.role, "p50": c.latency.get("p50"),
                                 "p95": c.latency.get("p95"), "note": c.latency.get("note")} for c in d.candidates])
    curve = svg.learning_curve(d.curve.points if d.curve else [], d.curve.fit if d.curve else None, r_value,
                               r_value - d.inputs.tolerance, d.metric)
    series, be = _volume_series(d)
    volume = svg.cost_vs_volume(series, be, d.inputs.monthly_requests)
    css_class = d.verdict.replace("'", "").replace(" ", "-")
    md = lambda s: escape(s).replace("`", "")  # noqa: E731
    parts = [f"<h1>Should we train a specialist for <code>{escape(d.task)}</code>?</h1>",
             *(f"<div class='warning' id='warning'><b>Read first:</b> {md(w)}</div>" for w in d.warnings),
             *(f"<p class='muted'>{md(x)}</p>" for x in header_lines(d)),
             f"<h2>Recommendation</h2><div class='verdict {css_class}' id='verdict'>{escape(d.verdict)}</div>",
             f"<p id='run'><b>{escape(run_line(d))}</b></p>" if d.run else "",
             "<ul id='reasons'>" + "".join(f"<li>{escape(r)}</li>" for r in d.reasons) + "</ul>",
             f"<div class='charts'><div id='plot-quality'>{quality}</div><div id='plot-latency'>{latency}</div>"
             f"<div id='plot-curve'>{curve}</div><div id='plot-volume'>{volume}</div></div>",
             "<h2>Candidates</h2>", table("candidates"), table("basis"),
             "<h2>Economics</h2>", table("economics"),
             "<p class='muted'>Self-hosted cost counts whole machines, always on, at the measured throughput; the API "
             "is priced per request. Break-even: the monthly volume at which one always-on machine costs what the "
             "API does.</p>", "<h2>Learning curve</h2>"]
    if "curve" in t:
        parts += [table("curve"), "<ul>" + "".join(f"<li>{escape(x)}</li>" for x in projection_lines(d)) + "</ul>"]
    else:
        parts.append("<p>No learning curve yet.</p>")
    parts.append(f"<h2>Risk</h2><p>{escape(d.risk.get('summary', 'unknown'))}</p>")
    if d.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in d.notes) + "</ul>")
    if d.history:
        parts.append("<h2>Decision history</h2><ul id='history'>" + "".join(f"<li>{escape(x)}</li>" for x in
                                                                          history_lines(d.history)) + "</ul>")
    return "".join(parts)
