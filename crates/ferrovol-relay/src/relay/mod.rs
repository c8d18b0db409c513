//! The relay: ferrovol's central controller for the local engine, run as a
//! Deployment with the standard (not node-deployment) sidecars. Node agents
//! dial in ([`agents::listen`]); [`engine::RelayEngine`] answers the CSI
//! controller services by asking the agent that holds each volume.

pub mod agents;
pub mod engine;
mod group;
mod wire;
