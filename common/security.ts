/**
 * Transport security and authorization, the same for every component.
 *
 *   TLS_CERT_FILE, TLS_KEY_FILE   this component's certificate and key (PEM): its gRPC server and ops
 *                                 port speak TLS, and its clients present them (mutual TLS)
 *   TLS_CA_FILE                   CA bundle (PEM): servers require client certificates it signed
 *                                 (mutual TLS); clients use TLS and verify servers against it
 *   AUTH_TOKEN                    bearer token: servers refuse calls without it (UNAUTHENTICATED),
 *                                 clients send it ("authorization: Bearer <token>")
 *
 * Nothing set: plaintext and open, which is why every component binds
 * 127.0.0.1 by default (see the README's threat model).
 */
import { readFileSync } from "node:fs";
import { timingSafeEqual } from "node:crypto";
import * as grpc from "@grpc/grpc-js";
import { ConfigError } from "./config.js";

export interface Security {
  /** This component's identity: served by its servers, presented by its clients. */
  cert: Buffer | null;
  key: Buffer | null;
  /** Peers are verified against this CA: clients use TLS, servers require client certificates. */
  ca: Buffer | null;
  token: string | null;
}

export const INSECURE: Security = Object.freeze({ cert: null, key: null, ca: null, token: null });

type Env = Record<string, string | undefined>;

function readPem(name: string, path: string | undefined): Buffer | null {
  if (!path) return null;
  try {
    return readFileSync(path);
  } catch (err) {
    throw new ConfigError(`${name}=${path}: cannot read it (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
}

/** Reads the security settings; flags (the CLI's) win over the environment. */
export function securityFromEnv(env: Env, flags: { cert?: string; key?: string; ca?: string; token?: string } = {}): Security {
  const certPath = flags.cert ?? env.TLS_CERT_FILE;
  const keyPath = flags.key ?? env.TLS_KEY_FILE;
  if (Boolean(certPath) !== Boolean(keyPath)) throw new ConfigError("TLS_CERT_FILE and TLS_KEY_FILE must be set together");
  const token = flags.token ?? env.AUTH_TOKEN ?? "";
  if (token && !/^[\x21-\x7e]{16,4096}$/.test(token)) throw new ConfigError("AUTH_TOKEN must be 16 to 4096 printable characters without spaces");
  return {
    cert: readPem("TLS_CERT_FILE", certPath),
    key: readPem("TLS_KEY_FILE", keyPath),
    ca: readPem("TLS_CA_FILE", flags.ca ?? env.TLS_CA_FILE),
    token: token || null,
  };
}

export function serverCredentials(s: Security): grpc.ServerCredentials {
  if (!s.cert || !s.key) return grpc.ServerCredentials.createInsecure();
  return grpc.ServerCredentials.createSsl(s.ca, [{ private_key: s.key, cert_chain: s.cert }], s.ca !== null);
}

export function channelCredentials(s: Security): grpc.ChannelCredentials {
  if (!s.ca) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(s.ca, s.key, s.cert);
}

/** The ops port's HTTPS options (fastify's `https`), or null for plain HTTP. */
export function httpsOptions(s: Security): { cert: Buffer; key: Buffer; ca?: Buffer; requestCert: boolean; rejectUnauthorized: boolean } | null {
  if (!s.cert || !s.key) return null;
  return { cert: s.cert, key: s.key, ...(s.ca ? { ca: s.ca } : {}), requestCert: s.ca !== null, rejectUnauthorized: s.ca !== null };
}

export function authMetadata(s: Security): grpc.Metadata | null {
  if (!s.token) return null;
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${s.token}`);
  return md;
}

/** Health checks stay open so that probes (compose, Kubernetes) need no secret. */
const OPEN_PREFIX = "/grpc.health.v1.Health/";

function tokenMatches(expected: Buffer, header: grpc.MetadataValue | undefined): boolean {
  if (typeof header !== "string" || !header.startsWith("Bearer ")) return false;
  const got = Buffer.from(header.slice(7));
  return got.length === expected.length && timingSafeEqual(got, expected);
}

/**
 * A grpc-js server interceptor that answers UNAUTHENTICATED before the
 * handler runs when the call lacks the token (every method but health).
 */
export function authInterceptor(token: string): grpc.ServerInterceptor {
  const expected = Buffer.from(`${token}`);
  return (method, call) =>
    new grpc.ServerInterceptingCall(call, {
      start(next) {
        next({
          onReceiveMetadata(md, mdNext) {
            if (method.path.startsWith(OPEN_PREFIX) || tokenMatches(expected, md.get("authorization")[0])) mdNext(md);
            else call.sendStatus({ code: grpc.status.UNAUTHENTICATED, details: `${method.path}: missing or wrong bearer token (this server requires AUTH_TOKEN)` });
          },
        });
      },
    });
}
