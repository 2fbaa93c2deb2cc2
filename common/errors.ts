/**
 * Domain errors. Model code throws these with the errno KVM (or the device
 * RFC) would return; the gRPC boundary (common/grpc.ts) maps the kind to a
 * status code once, so no handler picks status codes itself.
 */
export type ErrorKind =
  | "invalid-argument"
  | "not-found"
  | "already-exists"
  | "failed-precondition"
  | "resource-exhausted"
  | "permission-denied"
  | "unimplemented"
  | "unavailable"
  | "aborted"
  | "unauthenticated"
  | "internal";

export type Errno =
  | "EINVAL"
  | "ENOENT"
  | "ENXIO"
  | "EFAULT"
  | "ENOMEM"
  | "EEXIST"
  | "E2BIG"
  | "EBUSY"
  | "EPERM"
  | "ENOSPC"
  | "EOPNOTSUPP"
  | "ESRCH"
  | "ENODEV";

export class DomainError extends Error {
  constructor(
    readonly kind: ErrorKind,
    message: string,
    readonly errno?: Errno,
  ) {
    super(errno ? `${message} (${errno})` : message);
    this.name = "DomainError";
  }
}

export const invalidArgument = (message: string, errno?: Errno) =>
  new DomainError("invalid-argument", message, errno);
export const notFound = (message: string, errno?: Errno) => new DomainError("not-found", message, errno);
export const alreadyExists = (message: string, errno?: Errno) =>
  new DomainError("already-exists", message, errno);
export const failedPrecondition = (message: string, errno?: Errno) =>
  new DomainError("failed-precondition", message, errno);
export const resourceExhausted = (message: string, errno?: Errno) =>
  new DomainError("resource-exhausted", message, errno);
export const permissionDenied = (message: string, errno?: Errno) =>
  new DomainError("permission-denied", message, errno);
export const unimplemented = (message: string, errno?: Errno) =>
  new DomainError("unimplemented", message, errno);

/** A user-supplied string as an error message quotes it: at most max characters of it. */
export function echo(s: string, max = 80): string {
  return s.length <= max ? s : `${s.slice(0, max)}… (${s.length} characters)`;
}
