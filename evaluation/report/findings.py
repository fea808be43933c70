"""Findings written from the numbers; each says plainly when a published result does not reproduce."""

from __future__ import annotations

import math

import numpy as np  # noqa: E402

from steerloop.evaluation.report.rows import CODEVILLA_MSE_R, CODEVILLA_OTHER_R, MATCHED_FRAMES, OFFLINE_METRICS, SHORT_LOOP_METRICS, PolicyRow, SIMILAR_RMSE  # noqa: E402
from steerloop.evaluation.report.tables import _fmt, closed_loop_order  # noqa: E402


# ----------------------------------------------------------------------------- findings
def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else math.nan


def findings(rows: list[PolicyRow], corr: dict, compounding: dict, primary: str, dagger=()) -> list[str]:
    out = []
    zeros = rows[0].zeros["rmse"]
    n_routes = rows[0].results[primary][0]["aggregate"]["scenarios"]
    good_offline = [r for r in rows if r.offline["rmse"] < zeros / 2]
    drivers = [r for r in rows if (r.closed["success_rate"] or 0) >= 0.8]
    gap = [r for r in good_offline if (r.closed["success_rate"] or 0) < 0.5]
    out.append(f"**The gap.** {len(good_offline)} of {len(rows)} policies predict the held-out steering with an "
               f"RMSE below half the all-zeros baseline ({zeros / 2:.4f}). "
               + (f"{len(gap)} of them fail more than half of the {n_routes} `{primary}` routes: "
                  + ", ".join(f"{r.name} (RMSE {r.offline['rmse']:.4f}, success {r.closed['success_rate']:.2f})"
                              for r in gap) + "."
                  if gap else "None of them fails more than half of the routes: this population does not show the "
                  "gap at that threshold.")
               + (f" {len(drivers)} policies complete at least 80% of the routes with no departure "
                  f"(best: {closed_loop_order(rows)[0].name})." if drivers else
                  " No policy completes 80% of the routes without a departure."))
    success_corr = {off: corr[(off, "success_rate")]["pearson"][0] for off in OFFLINE_METRICS
                    if (off, "success_rate") in corr}
    valid = {k: v for k, v in success_corr.items() if not math.isnan(v)}
    if valid:
        best = max(valid, key=lambda k: abs(valid[k]))
        r_rmse = valid.get("rmse", math.nan)
        text = (f"**Which offline metric predicts driving (Codevilla et al.).** Across {len(rows)} policies, "
                f"the offline metric most correlated with success rate is `{best}` (Pearson r = {valid[best]:+.2f}); "
                f"RMSE gives r = {r_rmse:+.2f}. ")
        others = [abs(valid[k]) for k in ("mae", "qce", "tre") if k in valid]
        if not math.isnan(r_rmse) and others and max(others) > abs(r_rmse):
            text += (f"As in Codevilla et al. (MSE r = {CODEVILLA_MSE_R}, MAE/QCE/TRE r > {CODEVILLA_OTHER_R}), a "
                     "metric other than the squared error correlates better than RMSE" + (", and above 0.6." if max(others) > CODEVILLA_OTHER_R
                                                            else ", though not above 0.6: reproduced only in part."))
        else:
            text += ("This does not reproduce Codevilla et al.'s finding that MAE, QCE or TRE correlate better than "
                     "the squared error.")
        if best != "rmse" and "rmse" in valid:
            text += _overlap(corr[(best, "success_rate")]["pearson"], corr[("rmse", "success_rate")]["pearson"],
                             f"`{best}`", "RMSE")
        out.append(text)
        short = short_loop_finding(rows, corr, valid)
        if short:
            out.append(short)
    else:
        out.append("**Which offline metric predicts driving.** Success rate is the same for every policy, so no "
                   "correlation with it can be computed: the suite does not separate these policies.")
    twins = [(a, b) for a in rows for b in rows
             if abs(a.offline["rmse"] - b.offline["rmse"]) <= SIMILAR_RMSE * max(a.offline["rmse"], b.offline["rmse"])
             and (a.closed["success_rate"] or 0) - (b.closed["success_rate"] or 0) >= 0.5]
    if twins:
        a, b = max(twins, key=lambda p: (p[0].closed["success_rate"] or 0) - (p[1].closed["success_rate"] or 0))
        out.append(f"**Equal offline error, different driving.** {a.name} and {b.name} have offline RMSE "
                   f"{a.offline['rmse']:.4f} and {b.offline['rmse']:.4f} (within {SIMILAR_RMSE:.0%}) but succeed on "
                   f"{a.closed['success_rate']:.2f} and {b.closed['success_rate']:.2f} of the routes, as Codevilla et "
                   "al. observed.")
    best_offline = min(rows, key=lambda r: r.offline["rmse"])
    better = [r for r in rows if (r.closed["success_rate"] or 0) > (best_offline.closed["success_rate"] or 0)]
    out.append(f"**Best offline is not best on the road (comma.ai).** The policy with the lowest offline RMSE, "
               f"{best_offline.name} ({best_offline.offline['rmse']:.4f}), has success "
               f"{best_offline.closed['success_rate']:.2f}; {len(better)} of {len(rows)} policies drive with a "
               "strictly higher success rate. "
               + (_separated(rows, best_offline, better, primary) if better else
                  "None drives better: the published finding does not reproduce in this population."))
    recurrent = [r for r in rows if r.recurrent]
    single = [r for r in rows if not r.recurrent]
    if recurrent and single:
        s_rec, s_single = _mean(r.closed["success_rate"] for r in recurrent), _mean(r.closed["success_rate"]
                                                                                  for r in single)
        o_rec, o_single = _mean(r.offline["rmse"] for r in recurrent), _mean(r.offline["rmse"] for r in single)
        verdict = "helps" if s_rec > s_single else "hurts" if s_rec < s_single else "makes no difference"
        out.append(f"**History in closed loop.** Recurrent policies (with history) average success {s_rec:.2f} and "
                   f"offline RMSE {o_rec:.4f}; single-frame policies {s_single:.2f} and {o_single:.4f}. History "
                   f"{verdict} in closed loop here"
                   + (", although it predicts better offline (the copycat pattern)." if o_rec < o_single and
                      s_rec < s_single else "."))
    regimes = {}
    for r in rows:
        if r.regime != "user":  # a user's policy is not a data regime of the study
            regimes.setdefault(r.regime, []).append(r)
    if len(regimes) > 1:
        parts = [f"{name}: success {_mean(x.closed['success_rate'] for x in members):.2f}, recovery "
                 f"{_fmt(_mean(x.closed['recovery_rate'] for x in members), 2)}, on-policy RMSE "
                 f"{_mean(x.closed['on_policy_rmse'] for x in members):.4f} (n={len(members)})"
                 for name, members in sorted(regimes.items())]
        out.append("**Data regimes (DART noise, side cameras, DAgger).** " + "; ".join(parts) + ".")
    for policy, init, matched in dagger:
        control = max(matched, key=lambda m: m.closed["success_rate"] or 0.0) if matched else None
        beats = (policy.closed["success_rate"] or 0) > (init.closed["success_rate"] or 0) and (
            control is None or (policy.closed["success_rate"] or 0) > (control.closed["success_rate"] or 0))
        out.append(f"**DAgger (Ross et al.).** {policy.name} ({policy.frames} expert-labelled frames) succeeds on "
                   f"{policy.closed['success_rate']:.2f} of the routes, against {init.closed['success_rate']:.2f} for "
                   f"{init.name}, the behaviour-cloning policy it started from"
                   + (f", and {control.closed['success_rate']:.2f} for {control.name}, behaviour cloning on "
                      f"{control.frames} expert frames" if control else ", with no frame-matched behaviour-cloning "
                      "control in the study")
                   + (". DAgger wins." if beats else
                      ". Its starting policy already succeeds everywhere, so this pair cannot show a difference."
                      if (init.closed["success_rate"] or 0) >= 1.0 else
                      ". DAgger does not win here: the published finding does not reproduce in this setup."))
    ratios = [r.closed["on_policy_rmse"] / r.offline["rmse"] for r in rows if r.closed["on_policy_rmse"]]
    if ratios:
        grew = [f for f, c in compounding.items() if c["offset_last_10s"] > c["offset_first_10s"]]
        out.append(f"**Compounding error.** On their own states the policies' steering error is "
                   f"{min(ratios):.1f}x to {max(ratios):.1f}x their offline error (median {np.median(ratios):.1f}x). "
                   + (f"Mean |offset| grows from the first to the last 10 s of the routes for: {', '.join(grew)}."
                      if grew else "Mean |offset| does not grow over the routes for any family."))
    return out


def _separated(rows: list[PolicyRow], best_offline: PolicyRow, better: list[PolicyRow], primary: str) -> str:
    """Whether the best driver's success interval clears the best-offline policy's (a sentence)."""
    def interval(r: PolicyRow):
        return r.results[primary][0]["aggregate"].get("success_rate_ci95") or [None, None]

    top = max(better, key=lambda r: r.closed["success_rate"] or 0.0)
    (lo_top, _), (_, hi_best) = interval(top), interval(best_offline)
    if lo_top is not None and hi_best is not None and lo_top > hi_best:
        return (f"The published finding reproduces: {top.name}'s 95% interval of success [{lo_top:.2f}, ...] lies "
                f"above {best_offline.name}'s [..., {hi_best:.2f}].")
    return (f"The direction matches the published finding, but the 95% intervals of success of {top.name} and "
            f"{best_offline.name} overlap over these routes, so it is not established here.")


def _overlap(a: tuple, b: tuple, name_a: str, name_b: str) -> str:
    """Whether two correlations' 95% intervals overlap, said plainly (a sentence to append)."""
    (_, lo_a, hi_a), (_, lo_b, hi_b) = a, b
    if None in (lo_a, hi_a, lo_b, hi_b):
        return ""
    if hi_a < lo_b or hi_b < lo_a:
        return f" The intervals of {name_a} and {name_b} do not overlap."
    return (f" The 95% intervals of {name_a} [{lo_a:+.2f}, {hi_a:+.2f}] and {name_b} [{lo_b:+.2f}, {hi_b:+.2f}] "
            "overlap: this population does not separate the two.")


def short_loop_finding(rows: list[PolicyRow], corr: dict, offline_r: dict) -> str | None:
    """Does the short closed loop from logged states predict success better than offline metrics
    (NAVSIM's finding, Dauner et al. 2024)? Written from the correlations and their intervals."""
    short = {k: corr[(k, "success_rate")]["pearson"] for k in SHORT_LOOP_METRICS if (k, "success_rate") in corr
             and not math.isnan(corr[(k, "success_rate")]["pearson"][0])}
    if not short or not offline_r:
        return None
    best_short = max(short, key=lambda k: abs(short[k][0]))
    best_offline = max(offline_r, key=lambda k: abs(offline_r[k]))
    n = corr[(best_short, "success_rate")]["n"]
    r_short, r_off = short[best_short][0], offline_r[best_offline]
    text = (f"**Short closed loop from logged states (NAVSIM).** Across {n} policies, the short-loop score most "
            f"correlated with success is `{best_short}` (r = {r_short:+.2f}, Kendall τ = "
            f"{corr[(best_short, 'success_rate')]['kendall'][0]:+.2f}); the best offline metric, `{best_offline}`, "
            f"gives r = {r_off:+.2f}. ")
    if abs(r_short) > abs(r_off):
        text += "The short loop predicts driving better, as NAVSIM reported against displacement error."
    else:
        text += "The short loop does not predict driving better than the offline metrics here: NAVSIM's finding " \
                "does not reproduce in this population."
    return text + _overlap(short[best_short], corr[(best_offline, "success_rate")]["pearson"], f"`{best_short}`",
                           f"`{best_offline}`")


def dagger_comparisons(rows: list[PolicyRow], plan) -> list[tuple[PolicyRow, PolicyRow, list[PolicyRow]]]:
    """(DAgger policy, the behaviour-cloning policy it started from, behaviour-cloning
    policies of the same architecture with at least as many expert-labelled frames)."""
    by_name = {r.name: r for r in rows}
    out = []
    for r in rows:
        stage = plan.policies[r.name]
        if stage.kind != "dagger":
            continue
        init = by_name[stage.params["init"]]
        matched = [b for b in rows if plan.policies[b.name].kind == "train" and b.arch == r.arch
                   and b.frames >= MATCHED_FRAMES * r.frames and b is not init]
        out.append((r, init, matched))
    return out


def dagger_table(comparisons) -> str:
    lines = ["| DAgger policy | compared with | expert-labelled frames | success | mean abs offset [m] | recovery | "
             "on-policy RMSE |", "|---|---|---|---|---|---|---|"]
    for dagger, init, matched in comparisons:
        for row, role in ((dagger, "DAgger"), (init, "BC it started from"), *((m, "BC, as many frames") for m in matched)):
            lines.append(f"| {dagger.name} | {row.name} ({role}) | {row.frames} | {_fmt(row.closed['success_rate'], 2)} "
                         f"| {_fmt(row.closed['mean_abs_offset_m'])} | {_fmt(row.closed['recovery_rate'], 2)} | "
                         f"{_fmt(row.closed['on_policy_rmse'], 4)} |")
    return "\n".join(lines)
