//! The load plan: every tensor one rank reads, with its shape and how it is split over the
//! tensor-parallel ranks (the TP plan in ARCHITECTURE.md). `r4b inspect` sums it into bytes per
//! rank and checks it against the checkpoint before any GPU time is spent;
//! `worker/tests/checkpoint.rs` checks that the CPU loader reads exactly these bytes.

use crate::checkpoint::Checkpoint;
use crate::config::RConfig;
use crate::model::head::{HeadSource, EMBED_TOKENS};
pub use crate::shard::Split;
use crate::{Error, Result};

/// One tensor of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedTensor {
    /// Canonical (HF ≥ 4.52) name.
    pub name: String,
    /// Full shape.
    pub shape: Vec<usize>,
    /// Split over the ranks.
    pub split: Split,
}

/// Every tensor a rank loads, in load order (the head's tensor once, even when tied).
pub fn load_plan(cfg: &RConfig, head: HeadSource) -> Vec<PlannedTensor> {
    let mut plan = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, split: Split| {
        plan.push(PlannedTensor { name, shape, split })
    };
    let v = &cfg.vision;
    let vt = "model.vision_tower.vision_model";
    let (c, f, p) = (v.hidden_size, v.intermediate_size, v.patch_size);
    add(
        format!("{vt}.embeddings.patch_embedding.weight"),
        vec![c, v.num_channels, p, p],
        Split::Replicated,
    );
    add(
        format!("{vt}.embeddings.patch_embedding.bias"),
        vec![c],
        Split::Replicated,
    );
    add(
        format!("{vt}.embeddings.position_embedding.weight"),
        vec![v.num_patches(), c],
        Split::Replicated,
    );
    for i in 0..cfg.vision_layers_used() {
        let l = format!("{vt}.encoder.layers.{i}");
        for ln in ["layer_norm1", "layer_norm2"] {
            for part in ["weight", "bias"] {
                add(format!("{l}.{ln}.{part}"), vec![c], Split::Replicated);
            }
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(
                format!("{l}.self_attn.{proj}.weight"),
                vec![c, c],
                Split::Replicated,
            );
            add(
                format!("{l}.self_attn.{proj}.bias"),
                vec![c],
                Split::Replicated,
            );
        }
        add(format!("{l}.mlp.fc1.weight"), vec![f, c], Split::Replicated);
        add(format!("{l}.mlp.fc1.bias"), vec![f], Split::Replicated);
        add(format!("{l}.mlp.fc2.weight"), vec![c, f], Split::Replicated);
        add(format!("{l}.mlp.fc2.bias"), vec![c], Split::Replicated);
    }
    let (cf, h) = (cfg.vision_feature_width(), cfg.text.hidden_size);
    let mp = "model.multi_modal_projector";
    add(format!("{mp}.pre_norm.weight"), vec![cf], Split::Replicated);
    add(format!("{mp}.pre_norm.bias"), vec![cf], Split::Replicated);
    add(
        format!("{mp}.linear_1.weight"),
        vec![h, cf],
        Split::Replicated,
    );
    add(format!("{mp}.linear_1.bias"), vec![h], Split::Replicated);
    add(
        format!("{mp}.linear_2.weight"),
        vec![h, h],
        Split::Replicated,
    );
    add(format!("{mp}.linear_2.bias"), vec![h], Split::Replicated);
    add("model.image_newline".into(), vec![h], Split::Replicated);

    let t = &cfg.text;
    let lm = "model.language_model";
    add(EMBED_TOKENS.into(), vec![t.vocab_size, h], Split::Rows);
    for i in 0..t.num_hidden_layers {
        let l = format!("{lm}.layers.{i}");
        add(
            format!("{l}.input_layernorm.weight"),
            vec![h],
            Split::Replicated,
        );
        add(
            format!("{l}.self_attn.q_proj.weight"),
            vec![t.q_width(), h],
            Split::Rows,
        );
        add(
            format!("{l}.self_attn.k_proj.weight"),
            vec![t.kv_width(), h],
            Split::Rows,
        );
        add(
            format!("{l}.self_attn.v_proj.weight"),
            vec![t.kv_width(), h],
            Split::Rows,
        );
        add(
            format!("{l}.self_attn.o_proj.weight"),
            vec![h, t.q_width()],
            Split::Cols,
        );
        add(
            format!("{l}.self_attn.q_norm.weight"),
            vec![t.head_dim],
            Split::Replicated,
        );
        add(
            format!("{l}.self_attn.k_norm.weight"),
            vec![t.head_dim],
            Split::Replicated,
        );
        add(
            format!("{l}.post_attention_layernorm.weight"),
            vec![h],
            Split::Replicated,
        );
        let i_size = t.intermediate_size;
        add(
            format!("{l}.mlp.gate_proj.weight"),
            vec![i_size, h],
            Split::Rows,
        );
        add(
            format!("{l}.mlp.up_proj.weight"),
            vec![i_size, h],
            Split::Rows,
        );
        add(
            format!("{l}.mlp.down_proj.weight"),
            vec![h, i_size],
            Split::Cols,
        );
    }
    add(format!("{lm}.norm.weight"), vec![h], Split::Replicated);
    if head == HeadSource::LmHead {
        add(head.tensor().into(), vec![t.vocab_size, h], Split::Rows);
    }
    plan
}

/// What a plan costs on one rank of `tp`, against a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanSummary {
    /// Tensors the rank reads.
    pub tensors: usize,
    /// Bytes the rank reads from the checkpoint (stored dtypes).
    pub bytes_per_rank: u64,
    /// Stored tensors the plan does not read (canonical names where known).
    pub unused: Vec<String>,
}

/// Checks every planned tensor against the checkpoint (present, shape, float dtype, divisible by
/// `tp` along its split) and sums the bytes one rank of `tp` reads. Errors name the tensor.
pub fn summarize(plan: &[PlannedTensor], ckpt: &Checkpoint, tp: usize) -> Result<PlanSummary> {
    let mut bytes = 0u64;
    let mut used = std::collections::BTreeSet::new();
    for t in plan {
        let e = ckpt.entry(&t.name).ok_or_else(|| Error::MissingTensor {
            name: t.name.clone(),
        })?;
        if e.shape != t.shape {
            return Err(Error::TensorShape {
                name: t.name.clone(),
                found: e.shape.clone(),
                expected: t.shape.clone(),
            });
        }
        let size = (e.end - e.start) as u64;
        let dim = match t.split {
            Split::Replicated => None,
            Split::Rows => Some(0),
            Split::Cols => Some(1),
        };
        if let Some(d) = dim {
            if !t.shape.get(d).is_some_and(|n| n.is_multiple_of(tp)) {
                return Err(Error::TensorParallel {
                    tp,
                    reason: format!("`{}` {:?} does not split along dim {d}", t.name, t.shape),
                });
            }
        }
        bytes += if dim.is_some() {
            size / tp as u64
        } else {
            size
        };
        used.insert(ckpt.layout().stored_name(&t.name));
    }
    let unused = ckpt
        .stored_names()
        .filter(|n| !used.contains(*n))
        .map(str::to_string)
        .collect();
    Ok(PlanSummary {
        tensors: plan.len(),
        bytes_per_rank: bytes,
        unused,
    })
}
