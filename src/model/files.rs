//! Checks that a model's files are there before ONNX Runtime reads them, so that a missing one
//! is named.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A graph file and, where the graph refers to one, its external data file.
pub(crate) fn require_model_file(graph: &Path) -> Result<()> {
    require_file(graph)?;
    // The builder stores weights in `<model>.onnx.data`; ONNX Runtime's own message for a
    // missing one is cryptic, so check it here.
    let data = PathBuf::from(format!("{}.data", graph.display()));
    if external_data_expected(graph)? {
        require_file(&data)?;
    }
    Ok(())
}

fn require_file(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() > 0 => Ok(()),
        Ok(_) => Err(Error::ModelFile { path: path.to_path_buf(), reason: "empty or not a regular file".into() }),
        Err(e) => Err(Error::ModelFile { path: path.to_path_buf(), reason: format!("{e}") }),
    }
}

/// Whether the graph refers to an external data file named after it (a cheap byte search
/// for the file name in the protobuf, whose `location` entries hold it as plain text).
fn external_data_expected(decoder: &Path) -> Result<bool> {
    let bytes = std::fs::read(decoder).map_err(|e| Error::ModelFile { path: decoder.to_path_buf(), reason: e.to_string() })?;
    let name = format!("{}.data", decoder.file_name().and_then(|n| n.to_str()).unwrap_or("model.onnx"));
    Ok(bytes.windows(name.len()).any(|w| w == name.as_bytes()))
}
