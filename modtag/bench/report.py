"""The bench reports as short tables for people; the JSON (`modtag bench --json`) has every figure."""

from __future__ import annotations

from typing import Any

from modtag.bench.common import count_photos, ratio


def format_report(report: dict[str, Any]) -> str:
    """The report as a short table for people; the JSON has every figure."""
    if "tags" in report:
        return format_tags_report(report)
    workload, machine = report["workload"], report["machine"]
    load = machine.get("load_average_after")
    lines = [
        f"modtag bench: {workload['images']} photos x (caption of {workload['caption_tokens']} tokens, "
        f"{workload['probes']} probes, {workload['texts']} texts), models {workload['models']}",
        f"machine: {machine['processor']} ({machine['device']}, {machine['threads']} threads"
        f"{_cpu(machine)}), "
        f"torch {machine['torch']}, transformers {machine['transformers']}"
        + (f"; load average {load[0]:.1f} at the end" if load else ""),
        "",
        f"{'run':<16}{'dtype':<10}{'images/s':>10}{'s/image':>10}{'speedup':>10}",
    ]
    baseline = report["baseline"]
    rows = [("baseline", baseline), ("engine fp32", report["engine_fp32"]), ("engine fast", report["engine_fast"])]
    speedups = {"engine fp32": report["speedup_fp32"], "engine fast": report["speedup_fast"]}
    int8 = report.get("engine_int8")
    if int8:
        rows.append(("engine int8", int8))
        speedups["engine int8"] = ratio(int8["images_per_s"], baseline["images_per_s"] if baseline else None)
    for label, run in rows:
        if run is None:
            lines.append(f"{label:<16}{'-':<10}{'skipped':>10}")
            continue
        speedup = speedups.get(label)
        shown = "1.0x" if label == "baseline" else (f"{speedup:.1f}x" if speedup else "-")
        lines.append(
            f"{label:<16}{run['dtype']:<10}{run['images_per_s']:>10.3f}{1 / run['images_per_s']:>10.2f}{shown:>10}"
        )
    if baseline and baseline["images"] < workload["images"]:
        lines.append(f"(the baseline ran on the first {baseline['images']} of {workload['images']} images)")
    parity = report["parity"]
    lines.append("")
    if parity["max_abs_score_diff_fp32"] is not None:
        lines.append(
            f"parity fp32 vs baseline ({parity['compared_images']} images): max |score diff| "
            f"{parity['max_abs_score_diff_fp32']:.2e}, caption tokens identical "
            f"{parity['caption_token_agreement_fp32']:.1%}"
        )
    lines.append(
        f"parity {report['engine_fast']['dtype']} vs fp32: max |score diff| {parity['max_abs_score_diff_fast']:.3f} "
        f"(mean {parity['mean_abs_score_diff_fast']:.4f}; ITM {parity['max_abs_match_diff_fast']:.1e}), vision output "
        f"{_drift(parity['max_abs_vision_diff_fast'])}, caption tokens identical "
        f"{parity['caption_token_agreement_fast']:.1%}"
    )
    if int8:
        fidelity = int8["fidelity"]
        lines.append(
            f"int8 vs fp32: {report['speedup_int8_over_fast']:.2f}x the {report['engine_fast']['dtype']} engine; "
            f"max |score diff| {fidelity['max_abs_score_diff']:.3f} (mean {fidelity['mean_abs_score_diff']:.4f}; "
            f"ITM {fidelity['max_abs_match_diff']:.1e}), vision output {_drift(fidelity['max_abs_vision_diff'])}, "
            f"caption tokens identical {fidelity['caption_token_agreement']:.1%}, {fidelity['policy']} decisions "
            f"identical {fidelity['decision_agreement']:.1%} of {fidelity['decisions']}"
        )
    lines.append(
        f"useful work {report['flops_per_image'] / 1e9:.0f} GFLOP/image; engine fast "
        f"{report['achieved_flops_fast'] / 1e9:.0f} GFLOP/s = {report['fraction_of_peak_fast']:.0%} of the "
        f"{report['peak_flops_fast'] / 1e9:.0f} GFLOP/s a plain matrix product reaches here; fp32 "
        f"{report['fraction_of_peak_fp32']:.0%} of {report['peak_flops_fp32'] / 1e9:.0f}"
        + (
            f"; int8 {report['fraction_of_peak_int8']:.0%} of {report['peak_flops_int8'] / 1e9:.0f}"
            if report.get("peak_flops_int8")
            else ""
        )
    )
    lines += _stage_lines(report)
    stack = report.get("through_stack")
    if stack:
        lines.append(
            f"through the stack ({stack['policy']}, {stack['dtype']}): {stack['jobs_per_s']:.3f} jobs/s vs engine "
            f"alone {stack['engine_images_per_s']:.3f} images/s = {stack['ratio']:.0%}"
            + (f" ({stack['failed']} jobs failed)" if stack["failed"] else "")
        )
        now = stack.get("moderate_now") or {}
        if now.get("calls"):
            lines.append(
                f"  moderate now (Prefer: wait, idle worker, one call at a time): p50 {now['p50_s'] * 1000:.0f} ms, "
                f"p99 {now['p99_s'] * 1000:.0f} ms over {now['calls']} calls, {now['decided_in_time']} decided in time"
            )
        profile = stack.get("profile") or {}
        if profile.get("batches"):
            per_job = {stage: seconds for stage, seconds in profile["worker_s_per_job"].items() if seconds is not None}
            lines.append(
                f"  where the stack's time went: {profile['batches']} batches of {profile['mean_batch_images']:.1f} "
                f"images on average (engine alone: {stack['engine_batches']}); the engine computed "
                f"{profile['engine_busy_share']:.0%} of the time, at {profile['engine_images_per_s_in_stack']:.3f} "
                "images/s; per job in the worker: "
                + ", ".join(f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in per_job.items())
            )
    if report.get("peers"):
        from modtag.bench.peers import format_peers

        lines += format_peers(report["peers"])
    lines.append("")
    lines.append(
        "targets: "
        + ", ".join(
            f"{name} {'met' if met else 'MISSED'}" for name, met in report["targets"].items() if met is not None
        )
    )
    return "\n".join(lines)


def format_tags_report(report: dict[str, Any]) -> str:
    """`run_tags_bench`'s report as a short table for people."""
    tags, machine = report["tags"], report["machine"]
    before, after = machine.get("load_average_before"), machine.get("load_average_after")
    lines = [
        f"modtag bench --tags: {report['workload']['images']} photos, models {report['workload']['models']}, "
        f"{tags['dtype']}, batches of {tags['batch_size']}; policy {tags['policy']}: taxonomy {tags['taxonomy']}, "
        f"{tags['texts']} tags in {tags['groups']} groups, ITM on the top {tags['top_k']} of each "
        f"({tags['itm_texts_per_image']} texts per image)",
        f"machine: {machine['processor']} ({machine['device']}, {machine['threads']} threads"
        f"{_cpu(machine)}), "
        f"torch {machine['torch']}, transformers {machine['transformers']}"
        + (f"; load average {before[0]:.1f} at the start, {after[0]:.1f} at the end" if before and after else ""),
        "",
        f"{'what':<58}{'once (s)':>10}{'s/image':>10}",
    ]
    features, check, naive = tags["text_features"], tags["tags_check"], tags["naive_itm_all"]
    vision = tags["vision_itm"]["seconds_per_image"] + tags["vision_itm"]["preprocess_seconds_per_image"]
    rows: list[tuple[str, float | None, float | None]] = [
        (f"text features of the {tags['texts']} tags (worker start)", features["seconds"], None),
        ("vision pass of the ITM model (with preprocessing)", None, vision),
        (
            f"tags check: ITC over {tags['texts']} tags + ITM on {tags['itm_texts_per_image']}",
            None,
            check["seconds_per_image"],
        ),
        ("  of which ITC", None, check["itc_seconds_per_image"]),
        ("  of which ITM re-rank", None, check["itm_seconds_per_image"]),
        (
            f"naive: ITM over all {naive['texts']} tags ({count_photos(naive['images'])})",
            None,
            naive["seconds_per_image"],
        ),
    ]
    for attribute in tags["attributes"]:
        label = f"attribute: {attribute['question']} ({attribute['candidates']} answers)"
        rows.append((label, None, attribute["seconds_per_image"]))
        rows.append(("  of which beyond the VQA vision pass", None, attribute["beyond_vision_seconds_per_image"]))
    for label, once, per_image in rows:
        shown_once = f"{once:>10.2f}" if once is not None else f"{'':>10}"
        shown_image = f"{per_image:>10.4f}" if per_image is not None else ""  # ITC takes well under a millisecond
        lines.append(f"{label:<58}{shown_once}{shown_image}")
    lines += [
        "",
        f"the naive way costs {naive['times_the_tags_check']:.0f}x the tags check per image",
        f"ITC's shortlist held {naive['shortlist_recall']:.0%} of the naive way's top {tags['top_k']} per group "
        "(random weights rank at random: a quality figure for real weights only); the shortlisted tags' ITM "
        f"scores are within {naive['max_abs_score_diff']:.1e} of the naive way's",
    ]
    return "\n".join(lines)


def _stage_lines(report: dict[str, Any]) -> list[str]:
    # Per stage: its FLOPs, its time and share of the peak at each dtype, and the dtype int8's figures chose.
    shares: dict[str, dict[str, float | None]] = report.get("stage_share_of_peak") or {}
    if not shares:
        return []
    images = report["workload"]["images"]
    fast = report["engine_fast"]["dtype"]
    choices: dict[str, dict[str, Any]] = report.get("stage_dtypes") or {}
    seconds: dict[str, dict[str, float]] = {"float32": report["engine_fp32"]["stages_s"]}
    seconds[fast] = report["engine_fast"]["stages_s"]
    if choices:
        seconds[fast] = {stage: choice["fast_s"] for stage, choice in choices.items() if choice["fast_s"] is not None}
        seconds["int8"] = {stage: choice["int8_s"] for stage, choice in choices.items() if choice["int8_s"] is not None}
    dtypes = [dtype for dtype in ("float32", fast, "int8") if dtype in seconds]
    lines = [
        "",
        "per stage: ms/image and share of that dtype's matrix-product peak"
        + ("; int8 where it is faster and keeps agreement" if choices else ""),
        f"{'stage':<10}{'GFLOP':>7}" + "".join(f"{dtype:>17}" for dtype in dtypes) + ("   chosen" if choices else ""),
    ]
    for stage, by_dtype in shares.items():
        row = f"{stage:<10}{report['stage_flops_per_image'][stage] / 1e9:>7.1f}"
        for dtype in dtypes:
            stage_s, share = seconds[dtype].get(stage), by_dtype.get(dtype)
            cell = f"{stage_s / images * 1000:.0f} ms" if stage_s is not None else "-"
            row += f"{cell + (f' {share:4.0%}' if share is not None else '     '):>17}"
        choice = choices.get(stage)
        if choice:
            row += f"   {choice['dtype']} ({choice['int8_over_fast']:.2f}x at int8, {_agreement(choice)})"
        lines.append(row)
    workload = report.get("int8_workload")
    if workload:
        stages = ", ".join(workload["int8_stages"]) or "no stage"
        lines.append(
            f"int8 on {stages} ({fast} elsewhere), the whole workload interleaved over {workload['rounds']} rounds: "
            f"{workload['ratio_median']:.2f}x the {fast} engine (medians; best runs {workload['ratio_best']:.2f}x)"
        )
    return lines


def _agreement(choice: dict[str, Any]) -> str:
    if "caption_token_agreement" in choice:
        return f"caption tokens {choice['caption_token_agreement']:.0%} as fp32"
    return f"scores within {choice['max_abs_score_diff']:.3f} of fp32"


def _drift(value: float | None) -> str:
    return "not run" if value is None else f"max |diff| {value:.1e}"


def _cpu(machine: dict[str, Any]) -> str:
    if "cpu_family" not in machine:
        return ""
    return f"; {machine['cpu_family']}, {' '.join(machine['matrix_flags']) or 'no matrix flags'}"
