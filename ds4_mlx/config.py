"""Model arguments, read from a DeepSeek V4 config.json (the field names of the official release)."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from mlx_lm.models.base import BaseModelArgs


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "deepseek_v4"
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    # One entry per layer, then one per MTP layer (0 = window only, 4 = CSA, 128 = HCA).
    compress_ratios: List[int] = field(default_factory=list)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    # Numerics of the official code that are simulations of its low-precision kernels.
    # kv_fp8: FP8 round trip of the non-RoPE dims of window and compressed KV rows.
    # indexer_fp4: Hadamard rotation + FP4 round trip of the indexer queries and keys.
    # fp8_activations: FP8 (e4m3, block 128) round trip of the inputs of FP8/FP4 linears.
    kv_fp8: bool = True
    indexer_fp4: bool = True
    fp8_activations: bool = False

    def __post_init__(self):
        if self.scoring_func != "sqrtsoftplus":
            raise ValueError(f"scoring_func {self.scoring_func!r} is not supported (DeepSeek V4 uses sqrtsoftplus)")
        if self.n_shared_experts != 1:
            raise ValueError(f"n_shared_experts must be 1, got {self.n_shared_experts}")
        total = self.num_hidden_layers + self.num_nextn_predict_layers
        if len(self.compress_ratios) < self.num_hidden_layers:
            raise ValueError(
                f"compress_ratios has {len(self.compress_ratios)} entries; "
                f"config.json must give one per layer ({self.num_hidden_layers}) and MTP layer"
            )
        self.compress_ratios = list(self.compress_ratios) + [0] * (total - len(self.compress_ratios))
        bad = sorted({r for r in self.compress_ratios if r not in (0, 4, 128)})
        if bad:
            raise ValueError(f"unsupported compress ratios {bad}: DeepSeek V4 uses 0, 4 and 128")

    def compress_ratio(self, layer_id: int) -> int:
        return self.compress_ratios[layer_id]
