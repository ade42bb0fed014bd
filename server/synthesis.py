"""Phase `synthesis`: DP synthetic text from the DP teacher (DistilDP step 2).

The teacher is the base model + the final global adapter (merged), a DP release, so
everything generated from it is post-processing: it costs no privacy. Prompts are control
codes (a label + a blank line, exactly as the teacher rounds trained) drawn in proportion to
the DP label histogram (or the public split's labels), or the BOS token alone. The corpus
goes to RUN_DIR/synthetic/ in atomic JSONL shards; a killed generation resumes at its last
complete shard.
"""

from __future__ import annotations

from logging import INFO

from flwr.common.logger import log

from common.data.synthetic import PromptPlan, write_synthetic_corpus
from common.models.generation import HFGenerator, SamplingSettings
from common.models.loading import load_teacher

SYNTHETIC_DIR = "synthetic"


def sampling_settings(settings) -> SamplingSettings:
    s = settings.synthesis
    return SamplingSettings(max_new_tokens=s.gen_max_new_tokens, temperature=s.gen_temperature, top_k=s.gen_top_k,
                            top_p=s.gen_top_p, no_repeat_ngram_size=s.gen_no_repeat_ngram,
                            batch_size=s.gen_batch_size, seed=settings.seed)


def prompt_plan(phase) -> PromptPlan:
    settings = phase.settings
    if settings.synthesis.prompt_source == "bos":
        return PromptPlan({None: settings.synthesis.synthetic_records})
    weights = phase.summary_of("label-histogram")["weights"]
    return PromptPlan.allocate(settings.synthesis.synthetic_records, weights)


def shard_done(settings):
    """After each committed shard: say so, and (resume drills) stop after ``fail-phase-after`` shards."""
    def on_shard(index: int) -> None:
        log(INFO, "synthesis: shard %d committed", index + 1)
        if settings.fail_phase == "synthesis" and index + 1 == settings.fail_phase_after:
            raise RuntimeError(f"fault injected: synthesis stops after shard {index + 1}")
    return on_shard


def run(phase) -> dict:
    settings = phase.settings
    state = phase.state()
    teacher, tokenizer = load_teacher(settings.model_dir, settings.dp, phase.run.path / state["adapter"])
    plan = prompt_plan(phase)
    log(INFO, "synthesis: %d records from the DP teacher (%s prompts)", plan.total, settings.synthesis.prompt_source)
    manifest = write_synthetic_corpus(HFGenerator(teacher, tokenizer), plan, phase.run.path / SYNTHETIC_DIR,
                                      sampling_settings(settings), bos=tokenizer.bos_token,
                                      shard_size=settings.synthesis.shard_size, on_shard=shard_done(settings))
    log(INFO, "synthesis: kept %d records (%s), %.0f tokens/s", manifest["records"], manifest["filter"],
        manifest["tokens_per_second"])
    return {"directory": SYNTHETIC_DIR, "records": manifest["records"], "filter": manifest["filter"],
            "tokens": manifest["tokens_generated"], "tokens_per_second": manifest["tokens_per_second"],
            "shortfall": manifest["shortfall"]}
