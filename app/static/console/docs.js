// /docs: Swagger UI (vendored) over the service's own /openapi.json; "Try it out" sends the console's token.
"use strict";
(function () {
  const box = document.getElementById("swagger-ui");
  window.SwaggerUIBundle({
    url: box.dataset.openapiUrl,
    domNode: box,
    deepLinking: false,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    requestInterceptor: (request) => {
      const token = sessionStorage.getItem("boolq-api-token");
      if (token && !request.headers.Authorization) request.headers.Authorization = "Bearer " + token;
      return request;
    },
  });
})();
