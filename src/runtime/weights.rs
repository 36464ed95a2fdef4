//! Weights that edgellm maps itself: every initializer of a graph that lives in an external data
//! file is handed to ONNX Runtime in place, as a tensor over edgellm's read-only map of that file
//! (`AddInitializer`: ONNX Runtime takes it as it is, without a copy).
//!
//! Why: on the CPU, ONNX Runtime repacks the int4 MatMulNBits weights into its own layout at
//! load. It releases the file's copy of the packed data, but keeps the scales that MLAS's
//! int8-compute kernel also copies into its packed buffer and never reads again, so part of the
//! file stays resident for nothing (docs/performance.md, "Loading"). Here the map's pages leave the resident
//! set while the session is built and once it is built (`MADV_DONTNEED`); a later read fills a
//! page again from the page cache, so what stays resident is what runs read: the packed weights,
//! and the rows of the embedding and the norms that decoding touches.

use std::ffi::{c_void, CString};
use std::fs::File;
use std::path::{Component, Path};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ort::memory::MemoryInfo;
use ort::session::builder::SessionBuilder;
use ort::sys::{ONNXTensorElementDataType as ElementType, OrtValue};
use ort::AsPointer;

use super::onnx_proto::external_tensors;
use crate::error::{Error, Result};

/// ONNX Runtime's element type and its bytes for the ONNX data types that are handed over in
/// place; `None` for the rest (strings, sub-byte and 8-bit float types), which ONNX Runtime loads
/// itself.
fn element_type(data_type: i32) -> Option<(ElementType, usize)> {
    use ElementType::*;
    Some(match data_type {
        1 => (ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 4),
        2 => (ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, 1),
        3 => (ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, 1),
        4 => (ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16, 2),
        5 => (ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16, 2),
        6 => (ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, 4),
        7 => (ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 8),
        9 => (ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL, 1),
        10 => (ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, 2),
        11 => (ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE, 8),
        12 => (ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32, 4),
        13 => (ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64, 8),
        16 => (ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, 2),
        _ => return None,
    })
}

/// The maps of a graph's external data files and the tensors over them, which must outlive the
/// session they were given to (`LoadedSession` drops the session first).
pub(crate) struct MappedWeights {
    maps: Arc<Vec<memmap2::Mmap>>,
    values: Vec<NonNull<OrtValue>>,
}

// SAFETY: the values are tensors over read-only maps; ONNX Runtime's values may be released from
// any thread, and nothing here writes to them.
unsafe impl Send for MappedWeights {}
unsafe impl Sync for MappedWeights {}

impl Drop for MappedWeights {
    fn drop(&mut self) {
        for value in &self.values {
            // SAFETY: each value was made by CreateTensorWithDataAsOrtValue and is released once;
            // the session that used them is gone (`LoadedSession`'s field order).
            unsafe { (ort::api().ReleaseValue)(value.as_ptr()) };
        }
    }
}

impl MappedWeights {
    /// Maps the external data files of `model_file` (whose bytes are `graph`) and hands every
    /// initializer stored there to `builder` in place. Tensors that cannot be handed over as they are (a type without a
    /// whole byte size, an offset off the element's alignment, a location outside the model's
    /// folder) are left to ONNX Runtime, which reads them itself.
    pub(crate) fn attach(builder: &mut SessionBuilder, model_file: &Path, graph: &[u8]) -> Result<MappedWeights> {
        let file_error = |path: &Path, e: std::io::Error| Error::ModelFile { path: path.to_path_buf(), reason: e.to_string() };
        let dir = model_file.parent().unwrap_or(Path::new("."));
        let tensors = external_tensors(graph);
        let mut locations: Vec<&str> = Vec::new();
        let mut maps = Vec::new();
        for tensor in &tensors {
            let inside = Path::new(&tensor.location).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            if inside && !locations.contains(&tensor.location.as_str()) {
                let path = dir.join(&tensor.location);
                let file = File::open(&path).map_err(|e| file_error(&path, e))?;
                // SAFETY: the map is only read. A model file rewritten in place while it is served
                // changes what later reads see, as it would under ONNX Runtime's own map.
                maps.push(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| file_error(&path, e))?);
                locations.push(&tensor.location);
            }
        }
        let memory = MemoryInfo::default();
        let mut values = Vec::new();
        for tensor in &tensors {
            let (Some(index), Some((element, size))) =
                (locations.iter().position(|l| *l == tensor.location), element_type(tensor.data_type))
            else {
                continue;
            };
            let map = &maps[index];
            let elements: Option<u64> = tensor.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?));
            let Some(bytes) = elements.and_then(|n| n.checked_mul(size as u64)) else { continue };
            let fits = tensor.offset.checked_add(bytes).is_some_and(|end| end <= map.len() as u64);
            if !fits || tensor.length.is_some_and(|l| l != bytes) || tensor.offset % size as u64 != 0 {
                continue;
            }
            let Ok(name) = CString::new(tensor.name.as_str()) else { continue };
            let data = map[tensor.offset as usize..].as_ptr().cast_mut().cast::<c_void>();
            let mut value: *mut OrtValue = ptr::null_mut();
            // SAFETY: `data` points at `bytes` bytes inside a map that outlives the value (see
            // `MappedWeights`); ONNX Runtime only reads an initializer's data.
            let status = unsafe {
                (ort::api().CreateTensorWithDataAsOrtValue)(
                    memory.ptr(),
                    data,
                    bytes as usize,
                    tensor.dims.as_ptr(),
                    tensor.dims.len(),
                    element,
                    &mut value,
                )
            };
            // SAFETY: a status just returned by ONNX Runtime, owned here.
            unsafe { ort::Error::result_from_status(status) }.map_err(Error::from)?;
            let value = NonNull::new(value).expect("CreateTensorWithDataAsOrtValue gave a value");
            values.push(value);
            // SAFETY: the options and the value are alive; ONNX Runtime keeps the pointer, not a copy.
            let status = unsafe { (ort::api().AddInitializer)(builder.ptr_mut(), name.as_ptr(), value.as_ptr()) };
            // SAFETY: as above.
            unsafe { ort::Error::result_from_status(status) }.map_err(Error::from)?;
        }
        Ok(MappedWeights { maps: Arc::new(maps), values })
    }

    /// Drops the maps' pages from the resident set every few milliseconds while `build` runs
    /// (ONNX Runtime repacks and copies what it keeps meanwhile), and once after it.
    pub(crate) fn while_building<T>(&self, build: impl FnOnce() -> T) -> T {
        /// Stops the reaper however `build` ends (a panic included).
        struct Stop(Arc<AtomicBool>, Option<std::thread::JoinHandle<()>>);
        impl Drop for Stop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
                if let Some(reaper) = self.1.take() {
                    reaper.thread().unpark();
                    let _ = reaper.join();
                }
            }
        }
        let done = Arc::new(AtomicBool::new(false));
        let (maps, stop) = (Arc::clone(&self.maps), Arc::clone(&done));
        let reaper = std::thread::Builder::new()
            .name("weights-reaper".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    release(&maps);
                    std::thread::park_timeout(Duration::from_millis(5));
                }
            })
            .ok();
        let stop = Stop(done, reaper);
        let built = build();
        drop(stop);
        release(&self.maps);
        built
    }
}

/// Takes the maps' pages out of the resident set.
fn release(maps: &[memmap2::Mmap]) {
    for map in maps {
        // SAFETY: a read-only shared map of a file: a page dropped here is read again from the
        // file's page cache by the next access, with the same bytes. No reference into the map
        // is invalidated (the memory stays mapped).
        let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    }
}
