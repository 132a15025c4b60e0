//! What the admin CLI calls: status, tenants, keys, quotas, members and
//! rebalancing.

use super::{bad, ok, rss_bytes, NodeService, Rpc, VIEW_KEPT};
use crate::node::{gc, members, rebalance};
use crate::placement::{Layout, Member, MemberState, DEFAULT_CAPACITY};
use crate::rpc::pb;
use crate::rpc::status_of;
use crate::shard::command::{Rebalance, RebalanceState};
use crate::shard::{Command, ShardError};
use crate::types::ShardId;
use tonic::Response;
use tonic::{Request, Status};

fn quota_of(spec: &pb::TenantSpec) -> crate::shard::command::Quota {
    crate::shard::command::Quota {
        bytes: spec.quota_bytes,
        objects: spec.quota_objects,
    }
}

fn members_of(layout: &Layout) -> pb::Members {
    pb::Members {
        epoch: layout.epoch,
        members: layout
            .members
            .iter()
            .map(|(&id, m)| pb::Member {
                node_id: id,
                addr: m.addr.to_string(),
                zone: m.zone.clone(),
                capacity: m.capacity,
                state: m.state.name().into(),
                replicas: layout.shards_of(id).len() as u32,
            })
            .collect(),
    }
}

fn rebalance_status(r: Option<&Rebalance>) -> pb::RebalanceStatus {
    let Some(r) = r else {
        return pb::RebalanceStatus::default();
    };
    pb::RebalanceStatus {
        exists: true,
        id: r.id,
        state: match &r.state {
            RebalanceState::Running => "running".into(),
            RebalanceState::Done => "done".into(),
            RebalanceState::Cancelled => "cancelled".into(),
            RebalanceState::Failed(why) => format!("failed: {why}"),
        },
        moves: r
            .moves
            .iter()
            .map(|m| pb::PlannedMove {
                shard: m.shard.0,
                from: m.from,
                to: m.to,
                bytes: m.bytes,
            })
            .collect(),
        done: r.done as u32,
        bytes_copied: r.bytes_copied,
        rate: r.rate,
        cancel: r.cancel,
        updated_ms: r.updated_ms,
    }
}

pub(super) async fn create_tenant(
    this: &NodeService,
    req: Request<pb::TenantSpec>,
) -> Rpc<pb::Empty> {
    let r = req.into_inner();
    let quota = quota_of(&r);
    this.objects
        .create_tenant(&r.tenant, quota)
        .await
        .map_err(status_of)?;
    ok(pb::Empty {})
}

pub(super) async fn set_quota(this: &NodeService, req: Request<pb::TenantSpec>) -> Rpc<pb::Empty> {
    let r = req.into_inner();
    let quota = quota_of(&r);
    this.objects
        .set_quota(&r.tenant, quota)
        .await
        .map_err(status_of)?;
    ok(pb::Empty {})
}

pub(super) async fn show_tenant(
    this: &NodeService,
    req: Request<pb::TenantRequest>,
) -> Rpc<pb::TenantInfo> {
    let r = req.into_inner();
    this.objects
        .show_tenant(&r.tenant)
        .await
        .map(Response::new)
        .map_err(status_of)
}

pub(super) async fn list_tenants(
    this: &NodeService,
    _req: Request<pb::Empty>,
) -> Rpc<pb::TenantList> {
    let tenants = this.objects.list_tenants().await.map_err(status_of)?;
    ok(pb::TenantList {
        tenants: tenants
            .into_iter()
            .map(|(name, created_ms)| pb::TenantEntry { name, created_ms })
            .collect(),
    })
}

pub(super) async fn create_access_key(
    this: &NodeService,
    req: Request<pb::TenantRequest>,
) -> Rpc<pb::AccessKeyCreated> {
    let r = req.into_inner();
    let (access_key, secret_key) = this
        .objects
        .create_access_key(&r.tenant)
        .await
        .map_err(status_of)?;
    ok(pb::AccessKeyCreated {
        tenant: r.tenant,
        access_key,
        secret_key,
    })
}

pub(super) async fn list_access_keys(
    this: &NodeService,
    req: Request<pb::TenantRequest>,
) -> Rpc<pb::AccessKeyList> {
    let r = req.into_inner();
    let access_keys = this
        .objects
        .list_access_keys(&r.tenant)
        .await
        .map_err(status_of)?;
    ok(pb::AccessKeyList { access_keys })
}

pub(super) async fn revoke_access_key(
    this: &NodeService,
    req: Request<pb::AccessKeyRequest>,
) -> Rpc<pb::Empty> {
    let r = req.into_inner();
    this.objects
        .revoke_access_key(&r.access_key)
        .await
        .map_err(status_of)?;
    ok(pb::Empty {})
}

pub(super) async fn rotate_tenant_key(
    this: &NodeService,
    req: Request<pb::TenantRequest>,
) -> Rpc<pb::TenantInfo> {
    let r = req.into_inner();
    this.objects
        .rotate_tenant_key(&r.tenant)
        .await
        .map_err(status_of)?;
    this.objects
        .show_tenant(&r.tenant)
        .await
        .map(Response::new)
        .map_err(status_of)
}

pub(super) async fn delete_tenant(
    this: &NodeService,
    req: Request<pb::TenantRequest>,
) -> Rpc<pb::TenantDeletion> {
    let r = req.into_inner();
    let (buckets, shredded) = this
        .objects
        .delete_tenant(&r.tenant)
        .await
        .map_err(status_of)?;
    ok(pb::TenantDeletion {
        buckets,
        master_generation: this.objects.keys.master.current().0,
        shred_error: shredded.err().map(|e| e.to_string()).unwrap_or_default(),
    })
}

pub(super) async fn rotate_master_key(
    this: &NodeService,
    _req: Request<pb::Empty>,
) -> Rpc<pb::MasterRotation> {
    let (generation, rewrapped) = this.objects.rotate_master().await.map_err(status_of)?;
    ok(pb::MasterRotation {
        generation,
        rewrapped,
        nodes: this.objects.chunks.host.layout().live_nodes().len() as u32,
    })
}

pub(super) async fn add_node(
    this: &NodeService,
    req: Request<pb::AddNodeRequest>,
) -> Rpc<pb::Members> {
    let r = req.into_inner();
    let addr = r
        .addr
        .parse()
        .map_err(|e| bad(format!("node address {:?}: {e}", r.addr)))?;
    let member = Member {
        addr,
        zone: r.zone,
        capacity: if r.capacity == 0 {
            DEFAULT_CAPACITY
        } else {
            r.capacity
        },
        state: MemberState::Active,
    };
    let host = &this.objects.chunks.host;
    let layout = members::change(host, |l| members::add(l, r.node_id, member.clone()))
        .await
        .map_err(status_of)?;
    ok(members_of(&layout))
}

pub(super) async fn drain_node(
    this: &NodeService,
    req: Request<pb::NodeRequest>,
) -> Rpc<pb::RebalanceStatus> {
    let id = req.into_inner().node_id;
    this.change_then_rebalance(|l| members::drain(l, id)).await
}

pub(super) async fn remove_node(
    this: &NodeService,
    req: Request<pb::RemoveNodeRequest>,
) -> Rpc<pb::RebalanceStatus> {
    let r = req.into_inner();
    this.change_then_rebalance(|l| members::remove(l, r.node_id, r.dead))
        .await
}

pub(super) async fn rebalance(
    this: &NodeService,
    req: Request<pb::RebalanceRequest>,
) -> Rpc<pb::RebalanceStatus> {
    let r = req.into_inner();
    let chunks = &this.objects.chunks;
    if r.cancel {
        chunks
            .host
            .propose(ShardId::META, &Command::CancelRebalance)
            .await
            .map_err(status_of)?;
        let latest = rebalance::latest(&chunks.host).await.map_err(status_of)?;
        return ok(rebalance_status(latest.as_ref()));
    }
    if !r.dry_run {
        this.refuse_if_rebalancing().await?;
    }
    let max_moves = (r.max_moves > 0).then_some(r.max_moves as usize);
    let planned = rebalance::plan(chunks, max_moves, r.rate)
        .await
        .map_err(status_of)?;
    if !r.dry_run {
        rebalance::start(&chunks.host, &planned)
            .await
            .map_err(status_of)?;
    }
    ok(rebalance_status(Some(&planned)))
}

pub(super) async fn rebalance_progress(
    this: &NodeService,
    _req: Request<pb::Empty>,
) -> Rpc<pb::RebalanceStatus> {
    let latest = rebalance::latest(&this.objects.chunks.host)
        .await
        .map_err(status_of)?;
    ok(rebalance_status(latest.as_ref()))
}

/// Runs a collection from this node (any node may: a collection racing
/// the meta leader's is as safe as any write racing it).
pub(super) async fn collect_garbage(
    this: &NodeService,
    req: Request<pb::GcRequest>,
) -> Rpc<pb::GcReport> {
    let gc = this.objects.gc.clone();
    let host = this.objects.chunks.host.clone();
    if !req.into_inner().wait {
        tokio::spawn(async move {
            if let Err(e) = gc.collect(&host).await {
                tracing::warn!("garbage collection asked by an admin stopped: {e}");
            }
        });
        return ok(pb::GcReport {
            started_only: true,
            started_ms: crate::types::now_ms(),
            ..Default::default()
        });
    }
    let c = gc.collect(&host).await.map_err(status_of)?;
    ok(gc_report(&c))
}

fn gc_report(c: &gc::Collected) -> pb::GcReport {
    pb::GcReport {
        started_only: false,
        started_ms: c.started_ms,
        finished_ms: c.finished_ms,
        chunks: c.chunks,
        bytes: c.bytes,
        disk_bytes: c.disk_bytes,
        referenced: c.referenced,
        uploads_aborted: c.uploads_aborted,
    }
}

pub(super) async fn list_nodes(this: &NodeService, _req: Request<pb::Empty>) -> Rpc<pb::Members> {
    let layout = members::current(&this.objects.chunks.host)
        .await
        .map_err(status_of)?;
    ok(members_of(&layout))
}

pub(super) async fn status(this: &NodeService, _req: Request<pb::Empty>) -> Rpc<pb::NodeStatus> {
    let host = &this.objects.chunks.host;
    let (chunk_bytes, chunk_count) = this.objects.chunks.store.totals();
    let gc = this.objects.gc.clone();
    let disk = tokio::task::spawn_blocking(move || gc.disk_bytes())
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    let gc = &this.objects.gc;
    let last_gc = gc.last_collection.lock().unwrap().as_ref().map(gc_report);
    let swept = gc.last_sweep.lock().unwrap().clone().unwrap_or_default();
    ok(pb::NodeStatus {
        node_id: host.id,
        addr: host
            .addr_of(host.id)
            .map(|a| a.to_string())
            .unwrap_or_default(),
        shards: host.status(),
        chunk_bytes,
        chunk_count,
        chunks_missing: this.objects.chunks.missing.len() as u64,
        rss_bytes: rss_bytes(),
        gateways: this.fresh_gateway_views(),
        raft_log_bytes: disk.raft_log,
        state_bytes: disk.state,
        snapshot_bytes: disk.snapshots,
        last_gc,
        swept_files: swept.files,
        swept_bytes: swept.bytes,
        scrub: Some(this.objects.scrub.status()),
    })
}

impl NodeService {
    /// Refuses, changing nothing, while a rebalance runs.
    async fn refuse_if_rebalancing(&self) -> Result<(), Status> {
        let latest = rebalance::latest(&self.objects.chunks.host)
            .await
            .map_err(status_of)?;
        match latest {
            Some(r) if r.running() => Err(bad(format!(
                "a rebalance is already running ({} of {} moves done); wait for it, or stop it with `rebalance --cancel`",
                r.done,
                r.moves.len()
            ))),
            _ => Ok(()),
        }
    }

    /// Changes the layout (draining or removing a node), then starts the
    /// rebalance that moves replicas accordingly, if any need to move.
    async fn change_then_rebalance(
        &self,
        change: impl Fn(&mut Layout) -> Result<(), ShardError>,
    ) -> Rpc<pb::RebalanceStatus> {
        self.refuse_if_rebalancing().await?;
        let chunks = &self.objects.chunks;
        members::change(&chunks.host, change)
            .await
            .map_err(status_of)?;
        let planned = rebalance::plan(chunks, None, 0).await.map_err(status_of)?;
        if planned.moves.is_empty() {
            return ok(rebalance_status(None));
        }
        rebalance::start(&chunks.host, &planned)
            .await
            .map_err(status_of)?;
        ok(rebalance_status(Some(&planned)))
    }

    /// Gateway views younger than [`VIEW_KEPT`], by gateway name.
    fn fresh_gateway_views(&self) -> Vec<pb::GatewayView> {
        let mut views = self.gateway_views.lock().unwrap_or_else(|e| e.into_inner());
        views.retain(|_, (_, at)| at.elapsed() < VIEW_KEPT);
        let mut fresh: Vec<_> = views.values().map(|(v, _)| v.clone()).collect();
        fresh.sort_by(|a, b| a.gateway.cmp(&b.gateway));
        fresh
    }
}
