"""The two forms of one model that geno-eval scores: a geno-train checkpoint (megatron-core, at any
TP x PP over the processes torchrun starts, whatever layout it was saved at) and a HuggingFace
Mixtral export (transformers). Both answer the same two questions for a batch of token windows:

- ``logprobs(tokens [b, n]) -> [b, n - 1]``: log p(token t+1 | tokens 0..t), float64, nats;
- ``hidden(tokens [b, n], layer) -> [b, n, h]``: hidden states after ``layer`` (0: embeddings;
  1..L-1: after that transformer layer; L: after the last layer and the final RMSNorm, as
  transformers' ``hidden_states[L]``).

Every rank gets every result. Errors are EvalError naming the file or option at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from megatron_geno.evaluation.errors import EvalError, check_model_choice
from megatron_geno.vocab import PAD


def pysam_module():
    """pysam (the [eval] extra), or EvalError saying how to install it."""
    try:
        import pysam
    except ImportError:
        raise EvalError("geno-eval variants and embed read VCF, BCF and FASTA with pysam: pip "
                        "install 'megatron-geno[eval]'") from None
    from megatron_geno.quiet import is_verbose

    # htslib writes its own lines ("[E::fai_build3_core] Cannot index files compressed with
    # gzip") to stderr before pysam raises; the EvalError we raise says it in words. 3 is
    # htslib's default.
    pysam.set_verbosity(3 if is_verbose() else 0)
    return pysam


class MegatronModel:
    """A geno-train checkpoint on megatron-core, at parallel.tensor_parallel x pipeline_parallel
    x context_parallel (the rest of the world is data parallel: each data-parallel group scores
    its share). With context parallelism each window is split as in training (megatron-core's
    batch split: 2 x CP chunks, rank r keeps r and 2CP-1-r) and the results are put back in
    order, so a window longer than one device holds is scored with the numbers of one process."""

    kind = "megatron"

    def __init__(self, chunks: list, cfg, path, soft_mask: str) -> None:
        """Scores with model chunks already built (and loaded) under megatron-core's groups:
        geno-train's own during training, or MegatronModel.load's."""
        from megatron.core import parallel_state

        self.chunks, self.cfg, self.path, self.soft_mask = chunks, cfg, path, soft_mask
        self.num_layers = cfg.model.num_layers
        self.hidden_size = cfg.model.hidden_size
        self.tp = cfg.parallel.tensor_parallel
        self.cp = cfg.parallel.context_parallel
        self.ps = parallel_state
        self.device = next(chunks[0].parameters()).device  # where the chunks compute

    @classmethod
    def load(cls, checkpoint: str | Path, iteration: Optional[int] = None,
             tensor_parallel: int = 1, pipeline_parallel: int = 1,
             verify_checksums: bool = True, context_parallel: int = 1) -> "MegatronModel":
        from megatron_geno import distributed
        from megatron_geno.checkpointing import (CheckpointError, load_model_weights,
                                                 open_for_loading, resolve_checkpoint_dir,
                                                 saved_tokenizer)
        from megatron_geno.config import ConfigError, ModelConfig, ParallelConfig, TrainConfig
        from megatron_geno.model import build_model_chunks
        from megatron_geno.runtime import for_config
        from megatron_geno.tokenizer import VOCAB_SIZE, soft_mask_of_spec

        parallel = ParallelConfig(tensor_parallel=tensor_parallel,
                                  pipeline_parallel=pipeline_parallel,
                                  context_parallel=context_parallel)
        try:
            # the process groups first: the checkpoint checks share work across ranks
            distributed.initialize(TrainConfig(parallel=parallel, precision="fp32"), seed=0)
            ckpt = resolve_checkpoint_dir(checkpoint, iteration, fallback=False)
            common = open_for_loading(ckpt, verify_checksums)
        except (CheckpointError, ConfigError) as err:
            raise EvalError(str(err)) from None
        saved = common.get("model_config")
        if saved is None:
            raise EvalError(f"{ckpt}: no model_config in common.pt; not a geno-train checkpoint")
        known = set(ModelConfig.__dataclass_fields__)
        model_cfg = ModelConfig(**{k: v for k, v in saved.items() if k in known})
        # eval runs in fp32 with the local spec's eager kernels (no compile at start-up)
        model_cfg.fusions = "off"
        cfg = TrainConfig(model=model_cfg, parallel=parallel, precision="fp32")
        try:
            chunks = build_model_chunks(cfg, VOCAB_SIZE, initialize=False,
                                        runtime=for_config(cfg))
            load_model_weights(chunks, ckpt, common)
        except (CheckpointError, ConfigError) as err:
            raise EvalError(str(err)) from None
        for chunk in chunks:
            chunk.eval()
        # the policy of the run that saved it (config.yaml inside the iteration directory)
        return cls(chunks, cfg, ckpt, soft_mask_of_spec(saved_tokenizer(ckpt)))

    # ---- data parallelism: which batches this rank computes, and everyone gets all --------------

    def shard(self, n: int) -> tuple[int, int]:
        return self.ps.get_data_parallel_rank(), self.ps.get_data_parallel_world_size()

    def gather(self, mine: dict, all_ranks: bool = False):
        """Every data-parallel rank's {index: result} merged, on every rank (all_ranks: the list
        of every rank's object instead)."""
        group = self.ps.get_data_parallel_group()
        if torch.distributed.get_world_size(group) == 1:
            return [mine] if all_ranks else mine
        parts = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(parts, mine, group=group)
        return parts if all_ranks else {k: v for part in parts for k, v in part.items()}

    # ---- the forward pass -------------------------------------------------------------------

    def _padded(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens padded at the end (causal: earlier positions do not see it) to a multiple of TP
        (sequence parallelism splits the sequence over TP ranks) x 2 CP (CP's chunks)."""
        extra = -tokens.shape[1] % (self.tp * (2 * self.cp if self.cp > 1 else 1))
        if not extra:
            return tokens
        return torch.cat([tokens, torch.full((tokens.shape[0], extra), PAD, dtype=tokens.dtype)], 1)

    def _run(self, inputs: torch.Tensor, labels: Optional[torch.Tensor], capture=None):
        """One forward through every pipeline stage; returns the last stage's output (per-token
        losses with labels) broadcast to the whole pipeline group, or None when capture is set."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank({
            "tokens": inputs, "position_ids": torch.arange(inputs.shape[1])[None].expand_as(inputs),
            "labels": labels})
        batch = {k: None if v is None else v.to(self.device) for k, v in batch.items()}

        def forward_step(data_iterator, model):
            data = next(data_iterator)
            out = model(data["tokens"], data["position_ids"], None, labels=data["labels"])
            return out, None  # loss_func None: the schedule keeps the output itself

        iterator = iter([batch]) if len(self.chunks) == 1 else [iter([batch]) for _ in self.chunks]
        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iterator,
                model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                num_microbatches=1, seq_length=inputs.shape[1], micro_batch_size=inputs.shape[0],
                forward_only=True)
        if capture is not None:
            return None
        result = torch.empty(inputs.shape, dtype=torch.float32, device=self.device)
        if self.ps.is_pipeline_last_stage():
            result.copy_(self._whole_sequence(out[0].float(), dim=1))
        if self.ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(result, src=self.ps.get_pipeline_model_parallel_last_rank(),
                                        group=self.ps.get_pipeline_model_parallel_group())
        return result.cpu()

    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1] - 1
        inputs, labels = self._padded(tokens[:, :-1]), self._padded(tokens[:, 1:])
        losses = self._run(inputs, labels)
        return -losses[:, :n].double()

    def hidden(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        from megatron.core import tensor_parallel

        if self.ps.get_pipeline_model_parallel_world_size() > 1:
            raise EvalError("hidden states (geno-eval embed) need --pipeline-parallel 1")
        if not 0 <= layer <= self.num_layers:
            raise EvalError(f"--layer must be in [0, {self.num_layers}], got {layer}")
        model = self.chunks[0]
        decoder = model.decoder
        module = (model.embedding if layer == 0 else decoder.final_layernorm
                  if layer == self.num_layers else decoder.layers[layer - 1])
        captured = {}

        def hook(_module, _inputs, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output

        handle = module.register_forward_hook(hook)
        n = tokens.shape[1]
        try:
            self._run(self._padded(tokens), None, capture=True)
        finally:
            handle.remove()
        h = captured["h"]  # [s / (TP x CP), b, h] with sequence and context parallelism
        if self.tp > 1 and self.cfg.parallel.sequence_parallel:
            h = tensor_parallel.gather_from_sequence_parallel_region(h, False)
        return self._whole_sequence(h, dim=0).transpose(0, 1)[:, :n].float().cpu()

    def _whole_sequence(self, local: torch.Tensor, dim: int) -> torch.Tensor:
        """This CP rank's chunks of the sequence axis ``dim`` gathered from every CP rank, in
        sequence order (the whole tensor at CP = 1)."""
        if self.cp == 1:
            return local
        from megatron_geno.attention import gather_global

        with torch.no_grad():
            moved = local.movedim(dim, 0).contiguous()
            return gather_global(moved, self.ps.get_context_parallel_group()).movedim(0, dim)


class HFModel:
    """A HuggingFace Mixtral export through transformers (one process computes everything)."""

    kind = "hf"

    def __init__(self, hf_dir: str | Path) -> None:
        hf_dir = Path(hf_dir)
        config_file = hf_dir / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:
            raise EvalError(f"{config_file}: cannot read a HuggingFace config ({err})") from None
        if not isinstance(config, dict) or config.get("model_type") != "mixtral":
            found = config.get("model_type") if isinstance(config, dict) else None
            raise EvalError(f"{hf_dir} is not a Mixtral export (config.json model_type "
                            f"{found!r}; geno-convert to-hf writes 'mixtral')")
        from megatron_geno.tokenizer import read_hf_soft_mask

        try:  # an export of ours names its policy; another tokenizer reads as upper case
            self.soft_mask = read_hf_soft_mask(hf_dir) or "upper"
        except ValueError as err:
            raise EvalError(str(err)) from None
        _check_safetensors(hf_dir)
        try:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise EvalError("geno-eval --hf needs transformers: pip install "
                            "'megatron-geno[hf]' (or evaluate the geno-train checkpoint with "
                            "--checkpoint)") from None

        hf_logging.disable_progress_bar()  # geno-eval draws its own
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
        except Exception as err:  # noqa: BLE001 - transformers' and safetensors' errors vary
            raise EvalError(f"transformers cannot load {hf_dir}: "
                            f"{str(err).splitlines()[0]}") from None
        self.model.eval()
        self.path = hf_dir
        self.num_layers = config["num_hidden_layers"]
        self.hidden_size = config["hidden_size"]

    def shard(self, n: int) -> tuple[int, int]:
        return 0, 1

    def gather(self, mine: dict, all_ranks: bool = False):
        return [mine] if all_ranks else mine

    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(tokens[:, :-1]).logits.double()
        return torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]

    def hidden(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        if not 0 <= layer <= self.num_layers:
            raise EvalError(f"--layer must be in [0, {self.num_layers}], got {layer}")
        with torch.no_grad():
            out = self.model.model(tokens, output_hidden_states=True)
        return out.hidden_states[layer].float()


def _check_safetensors(hf_dir: Path) -> None:
    """Every weights file of an export opens with the safetensors library, which checks its header
    and that the file covers it (a truncated copy); EvalError naming the file otherwise."""
    from safetensors import SafetensorError, safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise EvalError(f"{hf_dir} holds no .safetensors weights (geno-convert to-hf writes them)")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as err:
            raise EvalError(f"{path} is damaged or truncated: {str(err).strip()[:200]}") from None


def open_model(checkpoint: Optional[str] = None, hf: Optional[str] = None,
               iteration: Optional[int] = None, tensor_parallel: int = 1,
               pipeline_parallel: int = 1, verify_checksums: bool = True,
               context_parallel: int = 1):
    """The model to score: --checkpoint (Megatron) or --hf (transformers), exactly one."""
    check_model_choice(checkpoint, hf, iteration, tensor_parallel, pipeline_parallel,
                       context_parallel)
    if hf is not None:
        return HFModel(hf)
    return MegatronModel.load(checkpoint, iteration, tensor_parallel, pipeline_parallel,
                              verify_checksums, context_parallel)


def for_each_batch(model, count: int, make, use, progress=None, compute=None) -> None:
    """Runs compute (model.logprobs) on this data-parallel group's share of batches 0..count-1
    (batch i is make(i)) and calls use(i, result) for each. Every rank runs the same number of
    forwards, so the pipeline and tensor-parallel collectives pair up; model.gather merges
    afterwards."""
    compute = compute or model.logprobs
    rank, size = model.shard(count)
    rounds = -(-count // size)
    steps = range(rounds)
    for r in progress(steps, desc="batches", total=rounds) if progress else steps:
        i = r * size + rank
        result = compute(make(min(i, count - 1)))
        if i < count:
            use(i, result)
