"""The "History and copycat" section: fed-back inputs, baselines, the copycat probe, the history sweep."""

from __future__ import annotations

import json
import math

from steerloop.evaluation.report.findings import _mean  # noqa: E402
from steerloop.evaluation.report.rows import PolicyRow  # noqa: E402
from steerloop.evaluation.report.tables import _fmt  # noqa: E402
from steerloop.evaluation.stats import spearman  # noqa: E402
from steerloop.training.copycat import probe_ratio  # noqa: E402


# ----------------------------------------------------------------------------- history and copycat
SWEEP_MIN = 3  # policies of one recipe with this many distinct windows make a history-length sweep
MODE_LABELS = {"teacher": "teacher forcing", "scheduled": "scheduled sampling", "dropout": "past-input dropout",
               "keyframe": "keyframe weighting"}


def _get(d: dict | None, *keys):
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def offline_with_logged_inputs(r: PolicyRow) -> float:
    """The offline RMSE a standard replay reports: teacher forced for a fed-back model (the
    logged commands in its loop), the plain replay otherwise."""
    forced = _get(r.history, "teacher_forced", "rmse")
    return forced if r.history.get("fed_back") and forced is not None else r.offline["rmse"]


def _inputs_label(r: PolicyRow) -> str:
    extra = [i for i in r.history.get("inputs", ["image"]) if i != "image"]
    if r.arch == "komanda":
        extra = ["own outputs"] + [i for i in extra if i != "prev_steering"]
    return "frames only" if not extra else "frames + " + ", ".join(extra)


def _probe_ratio(r: PolicyRow) -> float | None:
    probe, expert = r.history.get("probe"), r.history.get("expert_probe")
    return probe_ratio(probe, expert) if probe and expert else None


def history_table(rows: list[PolicyRow]) -> str:
    head = ("| policy | arch | inputs | trained with | T | offline RMSE, logged inputs | free running | "
            "change-points | steady | success | recovery | on-policy RMSE | probe R^2 (own steering) | "
            "probe ratio vs expert |")
    lines = [head, "|" + "|".join(["---"] * 14) + "|"]
    for r in rows:
        events = _get(r.history, "events", "model") or {}
        mode = MODE_LABELS.get(r.history.get("mode"), r.history.get("mode")) if (
            r.history.get("fed_back") or r.history.get("mode") == "keyframe") else "-"
        lines.append(f"| {r.name} | {r.arch} | {_inputs_label(r)} | {mode} | {r.history.get('seq_len', 'n/a')} | "
                     f"{_fmt(offline_with_logged_inputs(r), 4)} | "
                     f"{_fmt(r.offline['rmse'], 4) if r.history.get('fed_back') else '(same)'} | "
                     f"{_fmt(events.get('change_point_rmse'), 4)} | {_fmt(events.get('steady_rmse'), 4)} | "
                     f"{_fmt(r.closed['success_rate'], 2)} | {_fmt(r.closed['recovery_rate'], 2)} | "
                     f"{_fmt(r.closed['on_policy_rmse'], 4)} | {_fmt(_get(r.history, 'probe', 'r2'), 4)} | "
                     f"{_fmt(_probe_ratio(r), 2)} |")
    return "\n".join(lines)


def history_baselines(rows: list[PolicyRow]) -> str:
    """One line: all-zeros, repeat-previous (with its event split) and the expert's probe."""
    r = rows[0]
    repeat = r.history.get("repeat_previous") or {}
    events = _get(r.history, "events", "repeat_previous") or {}
    probe = r.history.get("expert_probe") or {}
    return (f"Baselines on the held-out logs: all-zeros RMSE {_fmt(r.zeros['rmse'], 4)}; repeat the previous "
            f"executed command (a pure copycat) RMSE {_fmt(repeat.get('rmse'), 4)}, at change-points "
            f"{_fmt(events.get('change_point_rmse'), 4)}, on steady segments {_fmt(events.get('steady_rmse'), 4)}. "
            f"Copycat probe on the expert's logged steering: the previous {probe.get('k', 'k')} commands explain "
            f"R^2 = {_fmt(probe.get('r2'), 4)} of the next.")


def sweep_groups(rows: list[PolicyRow]) -> list[list[PolicyRow]]:
    """Policies trained with one recipe except the window length, at SWEEP_MIN or more
    distinct lengths, sorted by it (the history-length sweep)."""
    groups: dict[str, list[PolicyRow]] = {}
    for r in rows:
        if r.history.get("seq_len") is not None and r.history.get("recipe"):
            groups.setdefault(json.dumps(r.history["recipe"], sort_keys=True), []).append(r)
    return [sorted(g, key=lambda r: r.history["seq_len"]) for g in groups.values()
            if len({r.history["seq_len"] for r in g}) >= SWEEP_MIN]


def sweep_table(groups: list[list[PolicyRow]], rows: list[PolicyRow]) -> str:
    lines = ["| policy | arch | inputs | T [frames] | offline RMSE, logged inputs | success | recovery | "
             "on-policy RMSE |", "|---|---|---|---|---|---|---|---|"]
    listed = [r for g in groups for r in g] + [r for r in rows if r.arch == "chauffeur"]
    for r in listed:
        lines.append(f"| {r.name} | {r.arch} | {_inputs_label(r)} | {r.history.get('seq_len')} | "
                     f"{_fmt(offline_with_logged_inputs(r), 4)} | {_fmt(r.closed['success_rate'], 2)} | "
                     f"{_fmt(r.closed['recovery_rate'], 2)} | {_fmt(r.closed['on_policy_rmse'], 4)} |")
    return "\n".join(lines)


def _verdict(with_history: float, without: float) -> str:
    if math.isnan(with_history) or math.isnan(without):
        return "cannot be judged"
    return "helps" if with_history > without else "hurts" if with_history < without else "makes no difference"


def history_findings(rows: list[PolicyRow]) -> list[str]:
    """Findings of the History and copycat section, from the numbers, whichever way they point."""
    out = []
    fed = [r for r in rows if r.history.get("fed_back")]
    frames_only = [r for r in rows if not r.history.get("fed_back")]
    repeat = _get(rows[0].history, "repeat_previous", "rmse")
    if repeat is not None:
        beat = [r for r in rows if offline_with_logged_inputs(r) < repeat]
        out.append(f"**The copycat's free offline score.** Repeating the previous executed command scores RMSE "
                   f"{repeat:.4f} on the held-out logs (all-zeros {rows[0].zeros['rmse']:.4f}). "
                   + (f"{len(beat)} of {len(rows)} policies beat it offline (fed-back models replayed with the logged "
                      "commands in their loop): " + ", ".join(f"{r.name} ({offline_with_logged_inputs(r):.4f})"
                                                             for r in beat) + "."
                      if beat else f"None of the {len(rows)} policies beats it offline: an offline table without this "
                      "baseline would flatter every one of them."))
    pairs = [(r, r.history["teacher_forced"]["rmse"], r.offline["rmse"]) for r in fed if r.history.get("teacher_forced")]
    if pairs:
        worse = [p for p in pairs if p[2] > p[1]]
        out.append("**Teacher forced vs free running, offline.** With the logged commands in their loop the fed-back "
                   "models score " + ", ".join(f"{r.name} {t:.4f} (free running {f:.4f})" for r, t, f in pairs)
                   + f"; feeding back their own outputs on the same frames is worse for {len(worse)} of {len(pairs)}.")
    if fed and frames_only:
        s_fed, s_frames = _mean(r.closed["success_rate"] for r in fed), _mean(r.closed["success_rate"]
                                                                             for r in frames_only)
        rec_fed, rec_frames = _mean(r.closed["recovery_rate"] for r in fed), _mean(r.closed["recovery_rate"]
                                                                                  for r in frames_only)
        o_fed, o_frames = _mean(offline_with_logged_inputs(r) for r in fed), _mean(offline_with_logged_inputs(r)
                                                                                  for r in frames_only)
        copycat = o_fed < o_frames and s_fed < s_frames
        out.append(f"**Does feeding back the previous command help?** Policies with fed-back inputs (n={len(fed)}) "
                   f"average success {s_fed:.2f}, recovery {_fmt(rec_fed, 2)}, offline RMSE {o_fed:.4f}; frames-only "
                   f"policies (n={len(frames_only)}) {s_frames:.2f}, {_fmt(rec_frames, 2)}, {o_frames:.4f}. Feeding "
                   f"back the previous command {_verdict(s_fed, s_frames)} in closed loop here"
                   + (", although it predicts better offline: the copycat pattern." if copycat else
                      "; the copycat pattern (better offline, worse on the road) does not appear." if o_fed < o_frames
                      else ", and it does not predict better offline either."))
    ratios = [(r, _get(r.history, "events", "model", "change_point_rmse"), _get(r.history, "events", "model",
                                                                                "steady_rmse")) for r in rows]
    ratios = [(r, c / s) for r, c, s in ratios if c is not None and s]
    if ratios:
        rp = _get(rows[0].history, "events", "repeat_previous") or {}
        rp_ratio = rp["change_point_rmse"] / rp["steady_rmse"] if rp.get("steady_rmse") else math.nan
        fed_ratio = _mean(x for r, x in ratios if r.history.get("fed_back"))
        frames_ratio = _mean(x for r, x in ratios if not r.history.get("fed_back"))
        out.append(f"**Where the error is: change-points vs steady driving.** The repeat-previous baseline's error is "
                   f"{_fmt(rp_ratio, 1)}x larger at the expert's steering change-points than on steady segments. "
                   f"Fed-back policies: {_fmt(fed_ratio, 1)}x on average; frames-only policies: "
                   f"{_fmt(frames_ratio, 1)}x. Largest: {max(ratios, key=lambda p: p[1])[0].name} "
                   f"({max(x for _, x in ratios):.1f}x).")
    probed = [(r, _probe_ratio(r)) for r in rows if _probe_ratio(r) is not None]
    if probed:
        expert_r2 = _get(rows[0].history, "expert_probe", "r2")
        below = [(r, x) for r, x in probed if x < 1.0]
        text = (f"**Copycat probe (Wen et al. 2020).** The previous {rows[0].history['expert_probe']['k']} commands "
                f"explain R^2 = {_fmt(expert_r2, 4)} of the expert's next command on the held-out logs. "
                + (f"{len(below)} of {len(probed)} policies steer more predictably from their own past than the expert "
                   f"(unexplained-variance ratio < 1): " + ", ".join(f"{r.name} ({x:.2f})" for r, x in below) + ". "
                   if below else "No policy steers more predictably from its own past than the expert. "))
        if len(probed) >= 3:
            rho = spearman([x for _, x in probed], [r.closed["success_rate"] or 0.0 for r, _ in probed])
            text += ("Success is the same for every policy, so it cannot be related to the ratio." if math.isnan(rho)
                     else f"Across policies the ratio and success rate have Spearman rho = {rho:+.2f}"
                     + (" (the more self-predictable, the worse it drives)." if rho > 0 else
                        " (self-predictability does not go with worse driving here)."))
        out.append(text)
    by_arch: dict[str, dict[str, list[PolicyRow]]] = {}
    for r in fed:
        by_arch.setdefault(r.arch, {}).setdefault(r.history.get("mode", "teacher"), []).append(r)
    for arch, modes in by_arch.items():
        if len(modes) < 2:
            continue
        parts = {m: (_mean(r.closed["success_rate"] for r in g), _mean(r.closed["recovery_rate"] for r in g), len(g))
                 for m, g in modes.items()}

        def rank(mode: str) -> tuple[float, float]:  # success first, then recovery
            success, recovery, _ = parts[mode]
            return (success, -1.0 if math.isnan(recovery) else recovery)

        best = max(sorted(parts), key=rank)
        verdict = ("." if "teacher" not in parts else
                   ", better than teacher forcing." if best != "teacher" and rank(best) > rank("teacher") else
                   "; no remedy beats plain teacher forcing here.")
        out.append(f"**Training the fed-back inputs ({arch}).** " + "; ".join(
            f"{MODE_LABELS.get(m, m)}: success {v[0]:.2f}, recovery {_fmt(v[1], 2)} (n={v[2]})"
            for m, v in sorted(parts.items())) + f". Best in closed loop (success, then recovery): "
            f"{MODE_LABELS.get(best, best)}{verdict}")
    for group in sweep_groups(rows):
        lengths = [r.history["seq_len"] for r in group]
        success = [r.closed["success_rate"] or 0.0 for r in group]
        rho = spearman(lengths, success)
        trend = ("longer windows drive better" if rho > 0 else "longer windows drive worse" if rho < 0
                 else "no trend" if not math.isnan(rho) else "no trend (success is the same at every length)")
        out.append(f"**History length ({group[0].arch}, {_inputs_label(group[0])}).** Success at T = "
                   + ", ".join(f"{t}: {x:.2f}" for t, x in zip(lengths, success))
                   + f" (Spearman rho {_fmt(rho, 2)}): {trend}.")
    return out
