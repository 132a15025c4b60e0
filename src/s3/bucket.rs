//! ListBuckets, CreateBucket, HeadBucket, DeleteBucket, GetBucketLocation.

use super::{timestamp, S3Front};
use crate::rpc::pb;
use s3s::dto::*;
use s3s::{S3Request, S3Response, S3Result};

impl S3Front {
    pub(super) async fn op_list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let tenant = self.tenant(&req).await?;
        let list = self
            .call(
                pb::TenantRequest {
                    tenant: tenant.clone(),
                },
                |mut c, r| async move { c.list_buckets(r).await },
            )
            .await?;
        let buckets = list
            .buckets
            .into_iter()
            .map(|b| Bucket {
                name: Some(b.name),
                creation_date: Some(timestamp(b.created_ms)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            owner: Some(Owner {
                display_name: Some(tenant.clone()),
                id: Some(tenant),
            }),
            ..Default::default()
        }))
    }

    async fn bucket_call<F, Fut>(&self, request: pb::BucketRequest, f: F) -> S3Result<()>
    where
        F: Fn(crate::rpc::NodeClient, pb::BucketRequest) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<pb::Empty>, tonic::Status>>,
    {
        self.call(request, f).await.map(|_| ())
    }

    /// A request about one bucket of `tenant`.
    fn bucket_request(tenant: String, bucket: &str) -> pb::BucketRequest {
        pb::BucketRequest {
            tenant,
            bucket: bucket.to_string(),
            ..Default::default()
        }
    }

    pub(super) async fn op_create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let tenant = self.tenant(&req).await?;
        let bucket = req.input.bucket.clone();
        // Named once here, so a retry on another node is the same request.
        let request = pb::BucketRequest {
            write_id: super::put::write_id(),
            ..Self::bucket_request(tenant, &bucket)
        };
        self.bucket_call(request, |mut c, r| async move { c.create_bucket(r).await })
            .await?;
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{bucket}")),
        }))
    }

    pub(super) async fn op_head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        let tenant = self.tenant(&req).await?;
        let request = Self::bucket_request(tenant, &req.input.bucket);
        self.bucket_call(request, |mut c, r| async move { c.head_bucket(r).await })
            .await?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    pub(super) async fn op_delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let tenant = self.tenant(&req).await?;
        let request = Self::bucket_request(tenant, &req.input.bucket);
        self.bucket_call(request, |mut c, r| async move { c.delete_bucket(r).await })
            .await?;
        Ok(S3Response::new(DeleteBucketOutput::default()))
    }

    pub(super) async fn op_get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        let tenant = self.tenant(&req).await?;
        let request = Self::bucket_request(tenant, &req.input.bucket);
        self.bucket_call(request, |mut c, r| async move { c.head_bucket(r).await })
            .await?;
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }
}
