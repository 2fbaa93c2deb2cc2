/** The migration controller as a library. */
export { migrate, MigrationError, DEFAULT_CONFIG, type MigrationConfig, type MigrationReport, type RoundReport, type ProgressEvent } from "./migrate.js";
export { textReport, jsonReport, htmlReport } from "./report.js";
export { ALIASES, allMechanisms, parseMechanism, PARTS, type Mechanism, type MechanismSpec } from "./trackers/index.js";
export { runCli } from "./cli.js";
