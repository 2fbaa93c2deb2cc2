/** The migration controller as a library. */
export { migrate, MigrationError, DEFAULT_CONFIG, type MigrationConfig, type MigrationReport, type RoundReport, type ProgressEvent } from "./migrate.js";
export { textReport, jsonReport, htmlReport } from "./report.js";
export { ALIASES, allMechanisms, parseMechanism, PARTS, type Mechanism, type MechanismSpec } from "./trackers/index.js";
export { runCli } from "./cli.js";
export { runComparison, type CellResult, type CompareOptions } from "./compare/run.js";
export { mechanismsByArch, type Cell } from "./compare/matrix.js";
export { rank, compareTable, compareJson, type RankBy } from "./compare/table.js";
export { predict, type Prediction, type PredictInput } from "./predict/model.js";
export { encodeTrace, decodeTrace, type TraceFile } from "./trace/format.js";
export { recordTrace } from "./trace/record.js";
