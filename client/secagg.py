"""The site's half of secure aggregation: Flower's `secaggplus_mod` around one DP-LoRA round.

The server's `SecAggPlusWorkflow` (Flower's legacy stack) sends four TRAIN messages a
round, each carrying a "secaggplus_configs" record: setup, share keys, collect masked
vectors, unmask. Flower's `secaggplus_mod` answers all four; only in the third does it call
the site's training, and then masks the adapter before it leaves. Under central DP the
server's `DifferentialPrivacyClientSideFixedClipping` adds a clipping norm to the fit
config, and Flower's `fixedclipping_mod` clips this site's update to it before masking.

Order matters and is fixed here: [held-out figures of the incoming adapter] → train → clip
(update − global ≤ C) → quantise and mask. The held-out figures travel in the reply's
metrics, beside ε and the loss, in the clear (as an evaluate reply would carry them);
only the adapter is masked.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.wire import ADAPTER_NAMES_KEY

# (global adapter, server round, fit config) → (adapter to release, metrics, refusal reason or "")
RoundTrainer = Callable[[dict[str, np.ndarray], int, dict], tuple[dict[str, np.ndarray], dict, str]]


class RoundRefusedError(RuntimeError):
    """This site sits the round out (e.g. its budget is spent); SecAgg+ treats it as a dropout."""


def is_secagg_message(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_train(msg: Message, context: Context, train_round: RoundTrainer, client_id: str) -> Message:
    """Answer one SecAgg+ stage; the third stage trains, clips when asked, and masks."""

    def fit(inner: Message, ctx: Context) -> Message:
        fitins = recorddict_to_fitins(inner.content, keep_input=True)
        names = str(fitins.config[ADAPTER_NAMES_KEY]).split(",")
        global_adapter = dict(zip(names, parameters_to_ndarrays(fitins.parameters), strict=True))
        adapter, metrics, refusal = train_round(global_adapter, int(fitins.config["server-round"]), fitins.config)
        if refusal:
            raise RoundRefusedError(f"refused: {refusal}")
        # Weight 1 for every site: SecAgg+ then averages exactly (see server/secagg.py). The legacy
        # reply has no record of its own for the site's id, so it travels with the metrics.
        fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([adapter[n] for n in names]), 1,
                        {**metrics, "client-id": client_id})
        return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=inner)

    def clip_then_fit(inner: Message, ctx: Context) -> Message:
        if KEY_CLIPPING_NORM in recorddict_to_fitins(inner.content, keep_input=True).config:
            return fixedclipping_mod(inner, ctx, fit)
        return fit(inner, ctx)

    return secaggplus_mod(msg, context, clip_then_fit)
