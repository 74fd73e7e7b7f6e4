//! Local files as a replication target (`replicate --to file --dir DIR`): each recovery point a qcow2 layer whose
//! backing file is the previous point.

pub mod replica;
