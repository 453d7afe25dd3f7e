//! The generated `odin.v1` protocol types and the encoded descriptor set that
//! reflection serves. Prost types stay at this edge; the rest of the crate
//! converts into them only when answering.

#![allow(missing_docs)]

tonic::include_proto!("odin.v1");

/// The encoded `FileDescriptorSet` of `odin.v1`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("odin_v1_descriptor");

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_names_the_detector_service() {
        let set =
            prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).expect("decodes");
        let file = set
            .file
            .iter()
            .find(|f| f.package() == "odin.v1")
            .expect("odin.v1 file present");
        assert!(file.service.iter().any(|s| s.name() == "Detector"));
    }
}
