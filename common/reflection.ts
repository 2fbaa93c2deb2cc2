/**
 * The package definition server reflection serves. proto-loader's
 * descriptors come from protobufjs, which names a map field's entry message
 * after the field ("Statuses") where protoc names it "StatusesEntry";
 * strict clients (Go's protodesc, so buf curl and grpcurl) reject such a file
 * and cannot find its services (grpc.health.v1's List has a map). The
 * entries are renamed as protoc names them before reflection indexes them.
 */
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, type DescriptorProto } from "@bufbuild/protobuf/wkt";
import type { PackageDefinition } from "@grpc/proto-loader";

/** protoc's map entry name: the field name in CamelCase, then "Entry" (descriptor.proto, MessageOptions.map_entry). */
const mapEntryName = (field: string) => field.replace(/(^|_)([a-z])/g, (_m, _u, c: string) => c.toUpperCase()).replaceAll("_", "") + "Entry";

function renameMapEntries(message: DescriptorProto): void {
  for (const nested of message.nestedType) renameMapEntries(nested);
  for (const entry of message.nestedType.filter((n) => n.options?.mapEntry)) {
    const field = message.field.find((f) => f.typeName === entry.name || f.typeName.endsWith(`.${message.name}.${entry.name}`));
    if (!field) continue;
    const name = mapEntryName(field.name);
    if (entry.name === name) continue;
    field.typeName = field.typeName.slice(0, field.typeName.length - entry.name.length) + name;
    entry.name = name;
  }
}

export function withProtocMapEntries(pkg: PackageDefinition): PackageDefinition {
  const fixed = new Map<Buffer, Buffer>();
  const fix = (bin: Buffer) => {
    let out = fixed.get(bin);
    if (!out) {
      const file = fromBinary(FileDescriptorProtoSchema, bin);
      for (const m of file.messageType) renameMapEntries(m);
      out = Buffer.from(toBinary(FileDescriptorProtoSchema, file));
      fixed.set(bin, out);
    }
    return out;
  };
  return Object.fromEntries(
    Object.entries(pkg).map(([name, def]) => [name, "fileDescriptorProtos" in def && Array.isArray(def.fileDescriptorProtos) ? { ...def, fileDescriptorProtos: def.fileDescriptorProtos.map(fix) } : def]),
  ) as PackageDefinition;
}
