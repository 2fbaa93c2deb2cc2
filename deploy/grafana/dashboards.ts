/**
 * The Grafana dashboards, built with Grafana's foundation SDK. `npm run
 * dashboards` writes them to deploy/grafana/dashboards/*.json (provisioned by
 * docker compose); a test checks that the committed JSON is this file's
 * output, and the end-to-end test runs every query against Prometheus.
 */
import { DashboardBuilder, DatasourceVariableBuilder, QueryVariableBuilder, RowBuilder, VariableRefresh, type DataSourceRef } from "@grafana/grafana-foundation-sdk/dashboard";
import { DataqueryBuilder } from "@grafana/grafana-foundation-sdk/prometheus";
import { PanelBuilder as TimeseriesBuilder } from "@grafana/grafana-foundation-sdk/timeseries";

/** Every panel queries the dashboard's $datasource, so that the dashboards import into an existing Grafana. */
export const DATASOURCE: DataSourceRef = { type: "prometheus", uid: "${datasource}" };

/** Units Grafana has no name for: a suffix, one unit per axis (PAGES_PER_S is packets/s). */
const PAGES_PER_S = "suffix: pages/s";
const PER_S = (what: string) => `suffix: ${what}/s`;

/** $vm: the VMs to show (all by default), from a metric every VM of the dashboard has. */
const vmVariable = (from: string) =>
  new QueryVariableBuilder("vm").label("VM").datasource(DATASOURCE).query(`label_values(${from}, vm)`).refresh(VariableRefresh.OnTimeRangeChanged).includeAll(true).multi(true).allValue(".+");

interface Query {
  expr: string;
  legend: string;
}

/** A time series panel; the unit is in the title too, so that nobody has to guess it. */
function panel(title: string, unit: string, description: string, queries: Query[], width = 12) {
  const p = new TimeseriesBuilder().title(title).description(description).unit(unit).datasource(DATASOURCE).height(8).span(width).min(0);
  queries.forEach((q, i) =>
    p.withTarget(new DataqueryBuilder().expr(q.expr).legendFormat(q.legend).refId(String.fromCharCode(65 + i)).datasource(DATASOURCE)),
  );
  return p;
}

function dashboard(uid: string, title: string, description: string) {
  return new DashboardBuilder(title)
    .withVariable(new DatasourceVariableBuilder("datasource").label("Data source").type("prometheus"))
    .uid(uid)
    .description(description)
    .tags(["dirty-tracking"])
    .refresh("5s")
    .time({ from: "now-15m", to: "now" })
    .timezone("browser")
    .editable();
}

export function dirtyRates() {
  return dashboard("dirty-rates", "Dirty rates", "How fast guests dirty memory, per VM and per vCPU, by dirty-tracking mechanism, and what tracking costs them.")
    .withVariable(vmVariable("hypervisor_guest_writes_total{vm=~\"$vm\"}"))
    .withRow(new RowBuilder("Dirty rate per VM"))
    .withPanel(panel("Dirty rate per VM (pages/s)", PAGES_PER_S, "Pages whose dirty bit went from clear to set, per second (recording rule over hypervisor_pages_dirtied_total).", [{ expr: "vm_mechanism:hypervisor_pages_dirtied:rate1m{vm=~\"$vm\"}", legend: "{{vm}} ({{mechanism}})" }]))
    .withPanel(panel("Dirty rate per VM (bytes/s)", "Bps", "The same rate in bytes: 4096 bytes per page.", [{ expr: "vm_mechanism:hypervisor_dirty_bytes:rate1m{vm=~\"$vm\"}", legend: "{{vm}} ({{mechanism}})" }]))
    .withPanel(
      panel("Dirty rate at each sync, QEMU-style (pages/s)", PAGES_PER_S, "Pages found dirty by GET_DIRTY_LOG over the guest time since the previous GET of the slot.", [
        { expr: "max by (vm, slot, mechanism) (hypervisor_sync_dirty_rate_pages_per_second{vm=~\"$vm\"})", legend: "{{vm}} slot {{slot}} ({{mechanism}})" },
      ]),
    )
    .withPanel(
      panel("Guest writes (writes/s)", "wps", "Guest writes completed, all vCPUs of each VM.", [{ expr: "sum by (vm) (rate(hypervisor_guest_writes_total{vm=~\"$vm\"}[1m]))", legend: "{{vm}}" }]),
    )
    .withRow(new RowBuilder("Dirty rate per vCPU"))
    .withPanel(panel("Dirty rate per vCPU (pages/s)", PAGES_PER_S, "Pages each vCPU dirtied while logging (a fault that logged, or a hardware update).", [{ expr: "vm_vcpu:hypervisor_vcpu_pages_dirtied:rate1m{vm=~\"$vm\"}", legend: "{{vm}} vCPU {{vcpu}}" }]))
    .withPanel(panel("Dirty rate per vCPU (bytes/s)", "Bps", "The per-vCPU rate in bytes.", [{ expr: "4096 * vm_vcpu:hypervisor_vcpu_pages_dirtied:rate1m{vm=~\"$vm\"}", legend: "{{vm}} vCPU {{vcpu}}" }]))
    .withRow(new RowBuilder("Cost of tracking"))
    .withPanel(panel("Write faults (faults/s)", PER_S("faults"), "Stage-2 write faults taken by the guest, per VM.", [{ expr: "vm:hypervisor_write_faults:rate1m{vm=~\"$vm\"}", legend: "{{vm}}" }]))
    .withPanel(
      panel("vCPU time lost to tracking (share of time)", "percentunit", "Guest time spent in faults of logging slots, per vCPU.", [
        { expr: "sum by (vm, vcpu) (rate(hypervisor_vcpu_tracking_overhead_seconds_total{vm=~\"$vm\"}[1m]))", legend: "{{vm}} vCPU {{vcpu}}" },
      ]),
    )
    .withPanel(
      panel("Dirty-ring full exits (exits/s)", PER_S("exits"), "KVM_EXIT_DIRTY_RING_FULL exits per second.", [
        { expr: "sum by (vm) (rate(hypervisor_dirty_ring_full_exits_total{vm=~\"$vm\"}[1m]))", legend: "{{vm}}" },
      ]),
    )
    .withPanel(
      panel("Guest time on full dirty rings (share of time)", "percentunit", "The share of guest time vCPUs sat out on full rings, summed over each VM's vCPUs.", [
        { expr: "sum by (vm) (rate(hypervisor_dirty_ring_stall_seconds_total{vm=~\"$vm\"}[1m]))", legend: "{{vm}}" },
      ]),
    )
    .withPanel(
      panel("Hardware dirty updates (updates/s)", PER_S("updates"), "Clean -> dirty descriptor updates done by hardware (DBM) without a fault.", [
        { expr: "sum by (vm) (rate(hypervisor_hardware_dirty_updates_total{vm=~\"$vm\"}[1m]))", legend: "{{vm}}" },
      ]),
    )
    .withPanel(
      panel("HDBSS buffer-full faults (faults/s)", PER_S("faults"), "FEAT_HDBSS permission faults of vCPUs whose buffer was full: KVM flushed it into the dirty log and resumed.", [
        { expr: "sum by (vm, vcpu) (rate(hypervisor_hdbss_full_faults_total{vm=~\"$vm\"}[1m]))", legend: "{{vm}} vCPU {{vcpu}}" },
      ]),
    )
    .withPanel(
      panel("PML-full exits (exits/s)", PER_S("exits"), "Intel PML-full exits of x86 vCPUs: KVM drained the 512-entry buffer into the dirty log and re-entered.", [
        { expr: "sum by (vm, vcpu) (rate(hypervisor_pml_full_exits_total{vm=~\"$vm\"}[1m]))", legend: "{{vm}} vCPU {{vcpu}}" },
      ]),
    )
    .withPanel(
      panel("Sync host time, p90 (seconds)", "s", "Simulated host time of one dirty-log sync call, by interface (get, clear, ring_reset, dbm_scan, device_read).", [
        { expr: "histogram_quantile(0.9, sum by (le, interface) (rate(hypervisor_dirty_log_sync_host_seconds_bucket[1m])))", legend: "{{interface}}" },
      ]),
    )
    .withPanel(panel("TLB flushes (flushes/s)", PER_S("flushes"), "VMID-wide TLB invalidations.", [{ expr: "sum by (vm) (rate(hypervisor_tlb_flushes_total{vm=~\"$vm\"}[1m]))", legend: "{{vm}}" }]));
}

export function device() {
  return dashboard("page-tracking-device", "Page-tracking device", "The page-tracking device: what it observes and logs, its buffers, its overflows, its reads, and its link to the hypervisor.")
    .withPanel(
      panel("GPAs observed and logged (GPAs/s)", PER_S("GPAs"), "GPAs the hypervisor reported for tracked CPUs, and those that entered the dirty log after de-duplication.", [
        { expr: "sum by (vmid) (rate(ptdevice_gpas_observed_total[1m]))", legend: "VMID {{vmid}} observed" },
        { expr: "sum by (vmid) (rate(ptdevice_gpas_logged_total[1m]))", legend: "VMID {{vmid}} logged" },
      ]),
    )
    .withPanel(
      panel("Buffers and logs (GPAs)", "short", "Not-yet-logged GPAs in the internal buffers, and GPAs in the dirty log waiting to be read.", [
        { expr: "sum by (vmid) (ptdevice_buffer_gpas)", legend: "VMID {{vmid}} buffered" },
        { expr: "sum by (vmid) (ptdevice_log_gpas)", legend: "VMID {{vmid}} in log" },
      ]),
    )
    .withPanel(
      panel("Log overflows and lost devices (events in 5m)", "short", "Dirty-log overflows (the hypervisor then marks the VM all dirty), and devices the hypervisor lost.", [
        { expr: "sum by (vmid) (increase(ptdevice_log_overflows_total[5m]))", legend: "VMID {{vmid}} overflows" },
        { expr: "sum (increase(hypervisor_page_tracking_device_lost_total[5m]))", legend: "devices lost" },
      ]),
    )
    .withPanel(
      panel("ReadDirty latency, p90 (seconds)", "s", "Time to serve one ReadDirty call.", [
        { expr: "histogram_quantile(0.9, sum by (le) (rate(ptdevice_read_dirty_seconds_bucket[1m])))", legend: "p90" },
      ]),
    )
    .withPanel(
      panel("Report stream lag (batches)", "short", "Write batches sent by the hypervisor and not yet acknowledged by the device.", [
        { expr: "sum by (instance) (hypervisor_page_tracking_device_stream_lag_batches)", legend: "{{instance}}" },
      ]),
    )
    .withPanel(
      panel("Tracking enabled (CPUs) and trackers", "short", "CPUs with tracking enabled per VMID, and trackers allocated per device.", [
        { expr: "sum by (vmid) (ptdevice_tracking_enabled_cpus)", legend: "VMID {{vmid}} CPUs" },
        { expr: "sum by (instance) (ptdevice_trackers)", legend: "{{instance}} trackers" },
      ]),
    );
}

export function migration() {
  return dashboard("migration", "Migration progress", "Migrations run by the migration controller: rounds, remaining bytes, expected downtime against the limit, downtime, and what the policies did (throttle, dirty limit, post-copy).")
    .withVariable(vmVariable("migration_in_progress"))
    .withPanel(panel("Round (syncs)", "short", "Dirty-state syncs so far in the current migration (QEMU's dirty-sync-count).", [{ expr: "max by (vm) (migration_round{vm=~\"$vm\"})", legend: "{{vm}}" }]))
    .withPanel(panel("Remaining (bytes)", "bytes", "Bytes still dirty at the last sync.", [{ expr: "max by (vm) (migration_remaining_bytes{vm=~\"$vm\"})", legend: "{{vm}}" }]))
    .withPanel(
      panel("Expected downtime against the limit (seconds)", "s", "Dirty bytes at the last sync divided by the bandwidth, and the downtime limit of the switchover rule.", [
        { expr: "max by (vm) (migration_expected_downtime_seconds{vm=~\"$vm\"})", legend: "{{vm}} expected" },
        { expr: "max by (vm) (migration_downtime_limit_seconds{vm=~\"$vm\"})", legend: "{{vm}} limit" },
      ]),
    )
    .withPanel(
      panel("Downtime, p50 and p99 (seconds)", "s", "Downtime of completed migrations.", [
        { expr: "histogram_quantile(0.5, sum by (le, mechanism) (rate(migration_downtime_seconds_bucket[5m])))", legend: "p50 {{mechanism}}" },
        { expr: "histogram_quantile(0.99, sum by (le, mechanism) (rate(migration_downtime_seconds_bucket[5m])))", legend: "p99 {{mechanism}}" },
      ]),
    )
    .withPanel(
      panel("Dirty rate at the last sync (pages/s)", PAGES_PER_S, "The controller's view: dirty pages found at the last sync over the time since the one before.", [
        { expr: "max by (vm) (migration_dirty_rate_pages_per_second{vm=~\"$vm\"})", legend: "{{vm}}" },
      ]),
    )
    .withPanel(panel("Link throughput (bytes/s)", "Bps", "Bytes sent on the migration link.", [{ expr: "sum by (vm) (rate(migration_transferred_bytes_total{vm=~\"$vm\"}[1m]))", legend: "{{vm}}" }]))
    .withPanel(
      panel("Migrations by result (in 5m)", "short", "Finished migrations: completed, failed, not_converged, verification_failed, postcopy_lost.", [
        { expr: "sum by (result, mechanism) (increase(migration_migrations_total[5m]))", legend: "{{result}} ({{mechanism}})" },
      ]),
    )
    .withPanel(
      panel("Total time, p50 (seconds)", "s", "Guest time of finished migrations.", [
        { expr: "histogram_quantile(0.5, sum by (le, mechanism) (rate(migration_total_time_seconds_bucket[5m])))", legend: "{{mechanism}}" },
      ]),
    )
    .withPanel(
      panel("Auto-converge: vCPU throttle (%)", "percent", "QEMU's cpu-throttle-percentage the policy has set on the source's vCPUs (0: none).", [
        { expr: "max by (vm) (migration_cpu_throttle_percentage{vm=~\"$vm\"})", legend: "{{vm}}" },
      ]),
    )
    .withPanel(
      panel("Dirty-limit: per-vCPU limit (bytes/s)", "Bps", "QEMU's vcpu-dirty-limit in service on the source's vCPUs (0: none).", [
        { expr: "max by (vm) (migration_vcpu_dirty_limit_bytes_per_second{vm=~\"$vm\"})", legend: "{{vm}}" },
      ]),
    )
    .withPanel(
      panel("Post-copy active", "short", "1 while the guest runs on the destination and its missing pages follow (QEMU's postcopy-active).", [
        { expr: "max by (vm) (migration_postcopy_active{vm=~\"$vm\"})", legend: "{{vm}}" },
      ]),
    );
}

export const DASHBOARDS = { "dirty-rates": dirtyRates, "page-tracking-device": device, migration };

/** Every dashboard as the JSON Grafana provisions. */
export function renderAll(): Record<string, string> {
  return Object.fromEntries(Object.entries(DASHBOARDS).map(([name, make]) => [name, JSON.stringify(make().build(), null, 2) + "\n"]));
}

/** Every query of every panel, for the end-to-end test: $vm stands for every VM, as the variable's "All" does. */
export function allQueries(): { dashboard: string; panel: string; expr: string }[] {
  const out: { dashboard: string; panel: string; expr: string }[] = [];
  for (const [name, make] of Object.entries(DASHBOARDS)) {
    for (const p of make().build().panels ?? []) {
      const panelObj = p as { title?: string; targets?: { expr?: string }[] };
      for (const t of panelObj.targets ?? []) if (t.expr) out.push({ dashboard: name, panel: panelObj.title ?? "", expr: t.expr.replaceAll("$vm", ".+") });
    }
  }
  return out;
}
