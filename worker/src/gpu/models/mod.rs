//! The models the GPU engine runs, each declared as a struct of [`super::layers`] with a forward
//! that reads like its CPU reference in `crate::model`.

pub mod r4b;
