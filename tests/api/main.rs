//! Integration tests: the real server on 127.0.0.1:0 with a fresh database each, over HTTP.
//! One binary with modules, so there is one link step.

mod backends;
mod helpers;

mod actors;
mod contract;
mod holds;
mod identity;
mod inventory_model;
mod inventory_nodes;
mod ledger;
mod limits;
mod locked;
mod logs;
mod metrics;
mod openapi;
mod payments_node;
mod process;
mod rate;
mod recovery;
mod saga;
mod seed_scripts;
mod services;
mod shards;
mod simulate;
mod stampede;
mod storage;
mod streams;
mod v2;
mod writer;
