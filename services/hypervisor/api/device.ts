/** The page-tracking device's registration (page_tracking_device_register / _unregister). */

import type { ApiContext, Handlers } from "./context.js";

export function deviceHandlers(ctx: ApiContext): Pick<Handlers, "registerPageTrackingDevice" | "unregisterPageTrackingDevice"> {
  const { devices } = ctx;
  return {
    async registerPageTrackingDevice(req) {
      return { linkId: await devices.register(req.address) };
    },
    async unregisterPageTrackingDevice(req) {
      await devices.unregister(req.address);
      return {};
    },
  };
}
