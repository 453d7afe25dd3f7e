//! Admission: one byte budget for every frame the server holds, over all
//! streams and unary calls together, so memory has a global bound however
//! many clients send at once.
//!
//! A frame is charged its size when it is read and keeps the charge until
//! it is answered. A stream whose next frame does not fit stops being read
//! (HTTP/2 flow control then holds its producer back); a unary call that
//! does not fit is refused at once with RESOURCE_EXHAUSTED.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::domain::{FrameRequest, ImageInput};

/// Bytes counted for a frame beyond its image, id and attributes: the
/// structs around them.
const OVERHEAD: usize = 512;

/// The byte budget. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

/// A frame's share of the budget, returned when dropped.
#[derive(Debug)]
pub struct Charge {
    _bytes: OwnedSemaphorePermit,
}

/// A frame that fits in the budget, ready to be judged.
#[derive(Debug)]
pub struct Admitted {
    /// The frame.
    pub request: FrameRequest,
    /// Its charge, held until it is answered.
    pub charge: Charge,
}

impl MemoryBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> MemoryBudget {
        MemoryBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The size `request` is charged.
    pub fn cost(request: &FrameRequest) -> usize {
        let image = match &request.image {
            None => 0,
            Some(ImageInput::Encoded(bytes)) => bytes.len(),
            Some(ImageInput::Raw(raw)) => raw.pixels.len(),
            Some(ImageInput::Tensor(t)) => t.data.len() * 4 + t.shape.len() * 4,
        };
        let attributes: usize = request
            .attributes
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        OVERHEAD + image + request.id.len() + attributes
    }

    /// Waits until `request` fits, then charges it. A frame larger than the
    /// whole budget is charged the whole budget, so it still gets through
    /// once everything else is answered. `None` only if the budget was
    /// closed, which nothing does.
    pub async fn admit(&self, request: FrameRequest) -> Option<Admitted> {
        let cost = self.clamped(&request);
        let bytes = Arc::clone(&self.bytes)
            .acquire_many_owned(cost)
            .await
            .ok()?;
        Some(Admitted {
            request,
            charge: Charge { _bytes: bytes },
        })
    }

    /// Charges `request` if it fits now; gives it back if not.
    pub fn try_admit(&self, request: FrameRequest) -> Result<Admitted, Box<FrameRequest>> {
        let cost = self.clamped(&request);
        match Arc::clone(&self.bytes).try_acquire_many_owned(cost) {
            Ok(bytes) => Ok(Admitted {
                request,
                charge: Charge { _bytes: bytes },
            }),
            Err(_) => Err(Box::new(request)),
        }
    }

    /// Bytes charged now.
    pub fn held(&self) -> usize {
        self.total - self.bytes.available_permits()
    }

    /// The whole budget, in bytes.
    pub fn total(&self) -> usize {
        self.total
    }

    fn clamped(&self, request: &FrameRequest) -> u32 {
        let cost = Self::cost(request).min(self.total);
        u32::try_from(cost).unwrap_or(u32::MAX)
    }
}
