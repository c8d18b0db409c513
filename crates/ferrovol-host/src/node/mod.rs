//! Node-side mechanics: reading the kernel's mount table, mounting, making
//! and growing filesystems, freezing them. The node service is built on
//! these; nothing here remembers state the kernel already has.

pub mod beneath;
pub mod freeze;
pub mod fs;
pub mod mountinfo;
pub mod quiesce;
pub mod read_only;
