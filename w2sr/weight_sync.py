"""The vLLM worker extension that lets a learner replace a running engine's weights.

vLLM imports this class by its dotted path (`worker_extension_cls`) and mixes it into its worker;
callers reach its methods through `LLM.collective_rpc`. The methods carry a `w2sr_` prefix so they
never shadow the worker's own (the CPU worker already has `update_weights`).

Weights arrive as Hugging Face names and CPU tensors, with the engine in the caller's process, so
no tensor is serialized on the way (through a subprocess engine they would arrive as nested lists).
"""

from __future__ import annotations

EXTENSION = "w2sr.weight_sync.WeightSyncExtension"


class WeightSyncExtension:
    def w2sr_load_weights(self, named_tensors: list) -> int:
        """Reload every given weight in place; vLLM's loader maps HF names to its fused layers.

        `reload_weights` rather than the model's `load_weights`: the CPU worker repacks weights
        after loading, and a second `load_weights` on repacked parameters fails.
        """
        self.model_runner.reload_weights(weights_iterator=iter(named_tensors))
        self._w2sr_repack_tied_head()
        return len(named_tensors)

    def _w2sr_repack_tied_head(self) -> None:
        """A tied output head shares the embedding's weight, but no weight is loaded into it, so
        vLLM does not re-run its processing: on CPU it would keep computing logits from a packed
        copy of the old embedding."""
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        tied = getattr(self.model_runner.model_config.hf_config, "tie_word_embeddings", False)
        if tied and head is not None and hasattr(head, "quant_method"):
            head.quant_method.process_weights_after_loading(head)

    def w2sr_get_weights(self, names: list[str]) -> dict:
        """Copies of the engine's parameters by vLLM name (unfused ones match HF names)."""
        params = dict(self.model_runner.get_model().named_parameters())
        return {name: params[name].detach().to("cpu", copy=True) for name in names}
