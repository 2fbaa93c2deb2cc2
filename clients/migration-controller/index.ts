/** The migration controller as a library. */
export { migrate, MigrationError, DEFAULT_CONFIG, type MigrationConfig, type MigrationReport, type RoundReport, type ProgressEvent } from "./migrate.js";
export { textReport, jsonReport, htmlReport } from "./report.js";
export { MECHANISMS, type Mechanism } from "./trackers/index.js";
export { runCli } from "./cli.js";
