//! End-to-end tests: a real `kiln` process on ephemeral ports, driven by real clients.
//! One test binary (modules below) so the workspace links it once.

mod alerts;
mod auth;
mod cli;
mod cluster;
mod compaction;
mod config;
mod crash;
mod devices;
mod flight;
mod grpc;
mod http;
mod kafka;
mod last_cache;
mod lifecycle;
mod limits;
mod mqtt;
mod object_storage;
mod persistence;
mod postgres;
mod pruning;
mod querier;
mod robustness;
mod sql;
mod sql_access;
mod support;
mod tls;
mod traces;
mod views;
