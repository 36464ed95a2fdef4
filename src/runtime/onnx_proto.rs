//! Reading an ONNX model's protobuf (ModelProto) bytes, as far as edgellm needs them: the main
//! graph's initializers (which live in external data files, their element types), its inputs'
//! element types and its nodes. A small reader of the protobuf wire format, no generated code:
//! a field it does not know is skipped, and a malformed message ends the reading.

/// One initializer stored outside the graph file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExternalTensor {
    pub name: String,
    /// ONNX's `TensorProto.DataType` (ONNX Runtime's element types use the same numbers).
    pub data_type: i32,
    pub dims: Vec<i64>,
    pub location: String,
    pub offset: u64,
    /// `None`: to the end of the file.
    pub length: Option<u64>,
}

/// The protobuf wire format, as far as reading a ModelProto's initializers needs it.
struct Wire<'a> {
    buf: &'a [u8],
    pos: usize,
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
    /// A 32-bit field's value (a float attribute).
    Fixed32(u32),
}

impl<'a> Wire<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Wire { buf, pos: 0 }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf.get(self.pos)?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// The next field's number and value; `None` at the end (or on a malformed message).
    fn next(&mut self) -> Option<(u64, Field<'a>)> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.pos = self.pos.checked_add(8).filter(|&p| p <= self.buf.len())?;
                Field::Fixed
            }
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                let end = self.pos.checked_add(len).filter(|&e| e <= self.buf.len())?;
                let bytes = &self.buf[self.pos..end];
                self.pos = end;
                Field::Bytes(bytes)
            }
            5 => {
                let end = self.pos.checked_add(4).filter(|&e| e <= self.buf.len())?;
                let value = u32::from_le_bytes(self.buf[self.pos..end].try_into().ok()?);
                self.pos = end;
                Field::Fixed32(value)
            }
            _ => return None,
        };
        Some((key >> 3, field))
    }
}

/// The initializers of the model's main graph that are stored in external data files, read from
/// the ModelProto bytes (ModelProto.graph = 7, GraphProto.initializer = 5).
pub(crate) fn external_tensors(model: &[u8]) -> Vec<ExternalTensor> {
    let mut found = Vec::new();
    for_graph_field(model, 5, |tensor| found.extend(external_tensor(tensor)));
    found
}

/// An initializer's element type (ONNX `TensorProto.DataType`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Initializer {
    pub data_type: i32,
}

/// Every initializer of the main graph, by name.
pub(crate) fn initializers(model: &[u8]) -> std::collections::HashMap<String, Initializer> {
    let mut found = std::collections::HashMap::new();
    for_graph_field(model, 5, |tensor| {
        if let Some((name, data_type, _)) = tensor_header(tensor) {
            found.insert(name, Initializer { data_type });
        }
    });
    found
}

/// The first length-delimited field `number` of a message.
fn bytes_field(bytes: &[u8], number: u64) -> Option<&[u8]> {
    let mut wire = Wire::new(bytes);
    std::iter::from_fn(move || wire.next()).find_map(|(n, f)| match f {
        Field::Bytes(b) if n == number => Some(b),
        _ => None,
    })
}

/// The element type of every tensor input of the main graph, by name (GraphProto.input = 11;
/// ValueInfoProto: name = 1, type = 2; TypeProto.tensor_type = 1; its elem_type = 1).
pub(crate) fn graph_input_types(model: &[u8]) -> std::collections::HashMap<String, i32> {
    let mut found = std::collections::HashMap::new();
    for_graph_field(model, 11, |value_info| {
        let name = bytes_field(value_info, 1).and_then(|b| std::str::from_utf8(b).ok());
        let tensor = bytes_field(value_info, 2).and_then(|t| bytes_field(t, 1));
        let elem_type = tensor.and_then(|t| {
            let mut wire = Wire::new(t);
            std::iter::from_fn(move || wire.next()).find_map(|(n, f)| match f {
                Field::Varint(v) if n == 1 => Some(v as i32),
                _ => None,
            })
        });
        if let (Some(name), Some(elem_type)) = (name, elem_type) {
            found.insert(name.to_string(), elem_type);
        }
    });
    found
}

/// A node of the main graph, as far as choosing kernels needs it.
#[derive(Debug, Default)]
pub(crate) struct Node {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub inputs: Vec<String>,
    /// Integer attributes.
    pub ints: Vec<(String, i64)>,
    /// Float attributes.
    pub floats: Vec<(String, f32)>,
    /// Whether an attribute holds a graph (If, Loop, Scan).
    pub has_subgraph: bool,
}

/// The nodes of the main graph (GraphProto.node = 1; NodeProto: input = 1, name = 3, op_type = 4,
/// attribute = 5, domain = 7; AttributeProto: name = 1, f = 2, i = 3, g = 6, graphs = 11). `None` if a
/// node cannot be read.
pub(crate) fn graph_nodes(model: &[u8]) -> Option<Vec<Node>> {
    let mut nodes = Vec::new();
    let mut readable = true;
    for_graph_field(model, 1, |bytes| match node(bytes) {
        Some(node) => nodes.push(node),
        None => readable = false,
    });
    readable.then_some(nodes)
}

fn node(bytes: &[u8]) -> Option<Node> {
    let text = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_string);
    let mut node = Node::default();
    let mut wire = Wire::new(bytes);
    while let Some((number, field)) = wire.next() {
        match (number, field) {
            (1, Field::Bytes(b)) => node.inputs.push(text(b)?),
            (3, Field::Bytes(b)) => node.name = text(b)?,
            (4, Field::Bytes(b)) => node.op_type = text(b)?,
            (7, Field::Bytes(b)) => node.domain = text(b)?,
            (5, Field::Bytes(attribute)) => {
                let (mut name, mut int, mut float) = (String::new(), None, None);
                let mut wire = Wire::new(attribute);
                while let Some((number, field)) = wire.next() {
                    match (number, field) {
                        (1, Field::Bytes(b)) => name = text(b)?,
                        (2, Field::Fixed32(v)) => float = Some(f32::from_bits(v)),
                        (3, Field::Varint(v)) => int = Some(v as i64),
                        (6 | 11, Field::Bytes(_)) => node.has_subgraph = true,
                        _ => {}
                    }
                }
                if let Some(v) = float {
                    node.floats.push((name.clone(), v));
                }
                node.ints.extend(int.map(|v| (name, v)));
            }
            _ => {}
        }
    }
    Some(node)
}

/// Calls `each` with the bytes of every field `number` of the ModelProto's graph (field 7).
fn for_graph_field<'a>(model: &'a [u8], number: u64, mut each: impl FnMut(&'a [u8])) {
    let mut top = Wire::new(model);
    while let Some((field_number, field)) = top.next() {
        let (7, Field::Bytes(graph)) = (field_number, field) else { continue };
        let mut graph = Wire::new(graph);
        while let Some((n, field)) = graph.next() {
            if let (true, Field::Bytes(bytes)) = (n == number, field) {
                each(bytes);
            }
        }
    }
}

/// A TensorProto's name, data type and dims (dims = 1, data_type = 2, name = 8).
fn tensor_header(bytes: &[u8]) -> Option<(String, i32, Vec<i64>)> {
    let (mut name, mut data_type, mut dims) = (String::new(), 0, Vec::new());
    let mut wire = Wire::new(bytes);
    while let Some((number, field)) = wire.next() {
        match (number, field) {
            (1, Field::Varint(d)) => dims.push(d as i64),
            (1, Field::Bytes(packed)) => {
                let mut packed_dims = Wire::new(packed);
                while packed_dims.pos < packed.len() {
                    dims.push(packed_dims.varint()? as i64);
                }
            }
            (2, Field::Varint(t)) => data_type = t as i32,
            (8, Field::Bytes(n)) => name = String::from_utf8(n.to_vec()).ok()?,
            _ => {}
        }
    }
    Some((name, data_type, dims))
}

/// TensorProto: dims = 1, data_type = 2, name = 8, external_data = 13 (key = 1, value = 2),
/// data_location = 14 (1: external).
fn external_tensor(bytes: &[u8]) -> Option<ExternalTensor> {
    let (name, data_type, dims) = tensor_header(bytes)?;
    let mut tensor = ExternalTensor { name, data_type, dims, location: String::new(), offset: 0, length: None };
    let mut external = false;
    let mut wire = Wire::new(bytes);
    while let Some((number, field)) = wire.next() {
        match (number, field) {
            (14, Field::Varint(location)) => external = location == 1,
            (13, Field::Bytes(entry)) => {
                let (mut key, mut value) = ("", "");
                let mut entry = Wire::new(entry);
                while let Some((number, field)) = entry.next() {
                    match (number, field) {
                        (1, Field::Bytes(k)) => key = std::str::from_utf8(k).ok()?,
                        (2, Field::Bytes(v)) => value = std::str::from_utf8(v).ok()?,
                        _ => {}
                    }
                }
                match key {
                    "location" => tensor.location = value.to_string(),
                    "offset" => tensor.offset = value.parse().ok()?,
                    "length" => tensor.length = Some(value.parse().ok()?),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    (external && !tensor.location.is_empty()).then_some(tensor)
}

/// Writing the protobuf wire format, for tests that make small ModelProto messages.
#[cfg(test)]
pub(crate) mod wire_writer {
    pub fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    /// A length-delimited field.
    pub fn bytes(number: u64, data: &[u8], out: &mut Vec<u8>) {
        varint(number << 3 | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    /// A varint field.
    pub fn int(number: u64, value: u64, out: &mut Vec<u8>) {
        varint(number << 3, out);
        varint(value, out);
    }
}

#[cfg(test)]
mod tests {
    use super::wire_writer::{bytes, varint};
    use super::*;

    fn entry(key: &str, value: &str) -> Vec<u8> {
        let mut e = Vec::new();
        bytes(1, key.as_bytes(), &mut e);
        bytes(2, value.as_bytes(), &mut e);
        e
    }

    #[test]
    fn reads_external_initializers_with_packed_and_unpacked_dims() {
        let mut external = Vec::new();
        let mut dims = Vec::new();
        varint(2560, &mut dims);
        varint(48, &mut dims);
        bytes(1, &dims, &mut external); // packed dims
        varint(2 << 3, &mut external);
        varint(2, &mut external); // uint8
        bytes(8, b"w_Q4", &mut external);
        bytes(13, &entry("location", "model.onnx.data"), &mut external);
        bytes(13, &entry("offset", "4096"), &mut external);
        bytes(13, &entry("length", "122880"), &mut external);
        varint(14 << 3, &mut external);
        varint(1, &mut external);
        let mut inline = Vec::new();
        varint(1 << 3, &mut inline);
        varint(3, &mut inline); // one unpacked dim
        varint(2 << 3, &mut inline);
        varint(1, &mut inline);
        bytes(8, b"norm", &mut inline);
        bytes(9, &[0; 12], &mut inline); // raw_data: not external
        let mut graph = Vec::new();
        bytes(1, b"a node we skip", &mut graph);
        bytes(5, &external, &mut graph);
        bytes(5, &inline, &mut graph);
        let mut model = Vec::new();
        varint(1 << 3, &mut model);
        varint(8, &mut model); // ir_version
        bytes(7, &graph, &mut model);
        let found = external_tensors(&model);
        assert_eq!(
            found,
            vec![ExternalTensor {
                name: "w_Q4".into(),
                data_type: 2,
                dims: vec![2560, 48],
                location: "model.onnx.data".into(),
                offset: 4096,
                length: Some(122880)
            }]
        );
        // A message cut short yields what was read before it, and no panic.
        assert!(external_tensors(&model[..model.len() - 3]).is_empty());
    }
}
