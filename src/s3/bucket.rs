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

    async fn bucket_call<F, Fut>(&self, tenant: String, bucket: String, f: F) -> S3Result<()>
    where
        F: Fn(crate::rpc::NodeClient, pb::BucketRequest) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<pb::Empty>, tonic::Status>>,
    {
        self.call(pb::BucketRequest { tenant, bucket }, f)
            .await
            .map(|_| ())
    }

    pub(super) async fn op_create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let tenant = self.tenant(&req).await?;
        let bucket = req.input.bucket.clone();
        self.bucket_call(tenant, bucket.clone(), |mut c, r| async move {
            c.create_bucket(r).await
        })
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
        self.bucket_call(tenant, req.input.bucket.clone(), |mut c, r| async move {
            c.head_bucket(r).await
        })
        .await?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    pub(super) async fn op_delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let tenant = self.tenant(&req).await?;
        self.bucket_call(tenant, req.input.bucket.clone(), |mut c, r| async move {
            c.delete_bucket(r).await
        })
        .await?;
        Ok(S3Response::new(DeleteBucketOutput::default()))
    }

    pub(super) async fn op_get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        let tenant = self.tenant(&req).await?;
        self.bucket_call(tenant, req.input.bucket.clone(), |mut c, r| async move {
            c.head_bucket(r).await
        })
        .await?;
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }
}
