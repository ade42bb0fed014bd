"""Phase `teacher-rounds`: federated DP-SGD LoRA rounds of the teacher (the `dp-lora` mode).

The round loop itself reads top to bottom in ``server/server_app.py`` (plain FedAvg) and
``server/secagg.py`` (SecAgg+); this phase picks one and reports the final teacher.
"""

from __future__ import annotations


def run(phase) -> dict:
    settings = phase.settings
    if settings.secure_aggregation:  # Flower's SecAgg+ exists only on its legacy workflow stack
        from server.secagg import run_secagg_federation

        state = run_secagg_federation(phase.grid, phase.context, settings)
    else:
        from server.server_app import run_federation

        state = run_federation(phase.grid, settings)
    last = state["rounds"][-1]["evaluate"] if state["rounds"] else state["baseline"]
    return {"rounds": state["completed_round"], "adapter": state["adapter"],
            "heldout_perplexity": last["perplexity"] if last else None}
