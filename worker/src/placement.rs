//! Where each rank of a GPU group runs: rank → visible GPU, and how many ranks share this rank's
//! GPU (their KV budgets split `--gpu-memory-utilization` between them). Pure arithmetic, so it
//! is tested without a GPU; the GPU engine opens the device it names.

use crate::{Error, Result};

/// This rank's place in the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The visible CUDA device this rank opens.
    pub device: usize,
    /// Ranks of the group on that device, this one included (≥ 1).
    pub ranks_on_device: usize,
    /// Distinct devices the group uses.
    pub devices_used: usize,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            device: 0,
            ranks_on_device: 1,
            devices_used: 1,
        }
    }
}

/// Every rank's device: `map[r]` when a map is given (one entry per rank, each below
/// `visible`), else `r % visible` (ranks spread over the visible GPUs, then share them).
pub fn devices(world: usize, map: &[u32], visible: usize) -> Result<Vec<usize>> {
    let bad = |reason: String| Error::TensorParallel { tp: world, reason };
    if visible == 0 {
        return Err(bad("no CUDA device is visible".into()));
    }
    if map.is_empty() {
        return Ok((0..world).map(|r| r % visible).collect());
    }
    if map.len() != world {
        return Err(bad(format!(
            "--device-map has {} entries for {world} ranks",
            map.len()
        )));
    }
    map.iter()
        .map(|&d| {
            let d = d as usize;
            if d < visible {
                Ok(d)
            } else {
                Err(bad(format!(
                    "--device-map names GPU {d}, but {visible} are visible"
                )))
            }
        })
        .collect()
}

/// The place of `rank` among `world` ranks (see [`devices`]).
pub fn place(rank: usize, world: usize, map: &[u32], visible: usize) -> Result<Placement> {
    let all = devices(world, map, visible)?;
    let device = *all.get(rank).ok_or_else(|| Error::TensorParallel {
        tp: world,
        reason: format!("rank {rank} is not below the world size"),
    })?;
    let mut used = all.clone();
    used.sort_unstable();
    used.dedup();
    Ok(Placement {
        device,
        ranks_on_device: all.iter().filter(|&&d| d == device).count(),
        devices_used: used.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_spread_over_the_visible_gpus_then_share_them() {
        // 8 ranks on one GPU: all on device 0, 8 to a device.
        assert_eq!(
            place(5, 8, &[], 1).unwrap(),
            Placement {
                device: 0,
                ranks_on_device: 8,
                devices_used: 1
            }
        );
        // 8 ranks on 8 GPUs: one each.
        assert_eq!(place(5, 8, &[], 8).unwrap().device, 5);
        assert_eq!(place(5, 8, &[], 8).unwrap().ranks_on_device, 1);
        // 4 ranks on 2 GPUs: 0 2 on device 0, 1 3 on device 1.
        assert_eq!(devices(4, &[], 2).unwrap(), vec![0, 1, 0, 1]);
        assert_eq!(place(3, 4, &[], 2).unwrap().ranks_on_device, 2);
        // 3 ranks on 2 GPUs: device 0 carries two.
        assert_eq!(place(0, 3, &[], 2).unwrap().ranks_on_device, 2);
        assert_eq!(place(1, 3, &[], 2).unwrap().ranks_on_device, 1);
    }

    #[test]
    fn an_explicit_map_is_followed_and_checked() {
        let p = place(2, 4, &[1, 1, 0, 1], 2).unwrap();
        assert_eq!((p.device, p.ranks_on_device, p.devices_used), (0, 1, 2));
        assert_eq!(place(0, 4, &[1, 1, 0, 1], 2).unwrap().ranks_on_device, 3);
        let short = place(0, 4, &[0, 0], 2).unwrap_err().to_string();
        assert!(short.contains("2 entries for 4 ranks"), "{short}");
        let far = place(0, 2, &[0, 3], 2).unwrap_err().to_string();
        assert!(
            far.contains("GPU 3") && far.contains("2 are visible"),
            "{far}"
        );
        assert!(place(0, 2, &[], 0).is_err());
    }
}
